// The REST API as operators and devices use it, including what it refuses:
// every refusal is a clear {error, message} and changes nothing.
import { readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { gzipSync } from 'node:zlib';
import { startTestController, type TestController } from './support/controller.js';
import { packBundle, packWithEntry, scriptBundle } from './support/bundles.js';
import { deviceKey, registerDevice, type DeviceKey } from './support/devices.js';

let tc: TestController;

beforeAll(async () => {
  tc = await startTestController();
});
afterAll(async () => tc.stop());

// Registration as the earlier system's scenario has it, plus the proof of possession the agent sends.
const register = (deviceId: string, key: DeviceKey = deviceKey()) => registerDevice(tc.api, deviceId, tc.creds.enrollment_token, key);

async function storedState() {
  const r = tc.controller.services.repos;
  return {
    bundles: await r.bundles.count({}),
    deployments: await r.deployments.count({}),
    states: await r.deviceDeployments.count({}),
    devices: await r.devices.count({}),
    blobs: (await readdir(join(tc.dataDir, 'blobs'))).filter((f) => !f.startsWith('.')).length,
  };
}

describe('authentication', () => {
  test('no token, a malformed header and an unknown token are 401', async () => {
    expect((await tc.api.withToken(undefined).get('/devices')).status).toBe(401);
    const bad = await tc.api.withToken(undefined).request('GET', '/devices', undefined, { authorization: 'Basic abc' });
    expect(bad.status).toBe(401);
    const unknown = await tc.api.withToken('kxt_nope').get('/devices');
    expect(unknown).toMatchObject({ status: 401, body: { error: 'unauthorized', message: expect.any(String) } });
  });

  test('a viewer reads but may not deploy; a device may not list the fleet', async () => {
    const { token } = await tc.controller.services.tokens.create('viewer', 'dashboard');
    const viewer = tc.api.withToken(token);
    expect((await viewer.get('/devices')).status).toBe(200);
    const denied = await viewer.post('/deployments', { bundle_version: '1.0.0', target_device_ids: ['x'] });
    expect(denied).toMatchObject({ status: 403, body: { error: 'forbidden' } });
    const dev = await register('auth-dev');
    expect((await tc.api.withToken(dev.body.token).get('/devices')).status).toBe(403);
  });
});

describe('registration', () => {
  test('needs an enrollment token', async () => {
    const before = await storedState();
    const res = await tc.api.withToken(undefined).post('/devices/register', { device_id: 'no-enroll', public_key: deviceKey().publicKeyPem });
    expect(res).toMatchObject({ status: 401, body: { error: 'enrollment_refused' } });
    expect(await storedState()).toEqual(before);
  });

  test('same key re-registers with a fresh token; another key for the id is 409', async () => {
    const first = await register('reg-1');
    expect(first.status).toBe(201);
    expect(first.body).toMatchObject({ device_id: 'reg-1', token: expect.stringMatching(/^kxd_/), mqtt_url: expect.stringMatching(/^mqtt:/) });
    // Used once, so the controller has it cached when it is replaced.
    expect((await tc.api.withToken(first.body.token).post('/devices/reg-1/heartbeat', {})).status).toBe(200);
    const again = await register('reg-1', first.key);
    expect(again.status).toBe(200);
    expect(again.body.token).not.toBe(first.body.token);
    // The old token no longer works, the new one does.
    expect((await tc.api.withToken(first.body.token).post('/devices/reg-1/heartbeat', {})).status).toBe(401);
    expect((await tc.api.withToken(again.body.token).post('/devices/reg-1/heartbeat', {})).status).toBe(200);
    const stolen = await register('reg-1');
    expect(stolen).toMatchObject({ status: 409, body: { error: 'conflict' } });
  });

  test('a device id that is not a safe topic segment is refused', async () => {
    for (const id of ['a/b', 'a+b', '#', '', 'x'.repeat(200)]) {
      const res = await register(id);
      expect(res.status).toBe(400);
      expect(res.body.error).toBe('invalid_request');
    }
  });
});

describe('bundles', () => {
  test('upload, list, info and download with Range', async () => {
    const bytes = await packBundle(scriptBundle('1.0.0', '/dev/null'));
    const up = await tc.api.upload(bytes, 'demo-1.0.0.tar.gz');
    expect(up.status).toBe(201);
    expect(up.body).toMatchObject({ version: '1.0.0', size: bytes.length, filename: 'demo-1.0.0.tar.gz', manifest: { deploy: { script: 'deploy.sh' } } });
    expect(up.body.sha256).toMatch(/^[0-9a-f]{64}$/);

    const list = await tc.api.get('/bundles');
    expect(list.body.map((b: { id: string }) => b.id)).toContain(up.body.id);

    const res = await fetch(`${tc.controller.httpUrl}/api/v1/bundles/${up.body.id}`, { headers: { authorization: `Bearer ${tc.creds.token}` } });
    expect(Buffer.from(await res.arrayBuffer()).equals(bytes)).toBe(true);
    expect(res.headers.get('accept-ranges')).toBe('bytes');

    const part = await fetch(`${tc.controller.httpUrl}/api/v1/bundles/${up.body.id}`, {
      headers: { authorization: `Bearer ${tc.creds.token}`, range: 'bytes=10-99' },
    });
    expect(part.status).toBe(206);
    expect(part.headers.get('content-range')).toBe(`bytes 10-99/${bytes.length}`);
    expect(Buffer.from(await part.arrayBuffer()).equals(bytes.subarray(10, 100))).toBe(true);

    const beyond = await fetch(`${tc.controller.httpUrl}/api/v1/bundles/${up.body.id}`, {
      headers: { authorization: `Bearer ${tc.creds.token}`, range: `bytes=${bytes.length + 5}-` },
    });
    expect(beyond.status).toBe(416);
  });

  test.each([
    ['no manifest', () => packBundle({ manifest: {}, files: {} }).then(() => packWithoutManifest()), /manifest\.json/],
    ['invalid semver', () => packBundle({ manifest: { version: 'one', deploy: { script: 'd.sh' } }, files: { 'd.sh': 'x' } }), /version/],
    ['no deploy script', () => packBundle({ manifest: { version: '5.0.0' }, files: {} }), /deploy/],
    ['script outside the bundle', () => packBundle({ manifest: { version: '5.0.1', deploy: { script: '../d.sh' } }, files: {} }), /script/],
    ['malformed manifest JSON', () => packBundle({ manifest: '{"version": ', files: {} }), /malformed JSON/],
    ['not gzip', async () => Buffer.from('this is not an archive at all'), /not a gzip/],
    ['gzip but not tar', async () => gzipSync(Buffer.alloc(4096, 7)), /corrupt|manifest/],
    ['truncated archive', async () => (await packBundle(scriptBundle('5.0.2', '/dev/null'))).subarray(0, 60), /corrupt|manifest/],
    ['path traversal entry', () => packWithEntry(scriptBundle('5.0.3', '/dev/null'), '../../escape.txt'), /outside the bundle/],
  ])('refuses a bundle with %s and stores nothing', async (_name, make, why) => {
    const before = await storedState();
    const res = await tc.api.upload(await make());
    expect(res.status).toBe(400);
    expect(res.body.error).toMatch(/invalid_(bundle|manifest)/);
    expect(res.body.message).toMatch(why);
    expect(await storedState()).toEqual(before);
  });

  test('a duplicate version is 409 and stores nothing', async () => {
    await tc.api.upload(await packBundle(scriptBundle('6.0.0', '/dev/null')));
    const before = await storedState();
    const dup = await tc.api.upload(await packBundle(scriptBundle('6.0.0', '/tmp/other')));
    expect(dup).toMatchObject({ status: 409, body: { error: 'conflict', message: expect.stringContaining('6.0.0') } });
    expect(await storedState()).toEqual(before);
  });

  test('an upload that is not multipart is refused', async () => {
    const res = await tc.api.post('/bundles', { file: 'x' });
    expect(res.status).toBe(400);
  });
});

async function packWithoutManifest(): Promise<Buffer> {
  const { mkdtemp, writeFile, readFile } = await import('node:fs/promises');
  const { tmpdir } = await import('node:os');
  const tar = await import('tar');
  const dir = await mkdtemp(join(tmpdir(), 'kernex-nomanifest-'));
  await writeFile(join(dir, 'deploy.sh'), 'echo hi');
  await tar.c({ gzip: true, file: join(dir, 'b.tgz'), cwd: dir }, ['deploy.sh']);
  return readFile(join(dir, 'b.tgz'));
}

describe('deployments', () => {
  test('bad requests are refused with a reason and create nothing', async () => {
    await register('dep-1');
    await tc.api.upload(await packBundle(scriptBundle('7.0.0', '/dev/null')));
    const before = await storedState();
    const cases: Array<[unknown, number, RegExp]> = [
      [{ bundle_version: '7.0.0', target_device_ids: ['dep-1', 'ghost'] }, 400, /ghost/],
      [{ bundle_version: '9.9.9', target_device_ids: ['dep-1'] }, 400, /9\.9\.9/],
      [{ bundle_id: 'nope', target_device_ids: ['dep-1'] }, 400, /nope/],
      [{ bundle_version: '7.0.0', target_device_ids: [] }, 400, /target_device_ids/],
      [{ bundle_version: '7.0.0', target_device_ids: 'dep-1' }, 400, /target_device_ids/],
      [{ bundle_version: '7.0.0', target_device_ids: [{ $ne: null }] }, 400, /target_device_ids/],
      [{ bundle_version: { $gt: '' }, target_device_ids: ['dep-1'] }, 400, /bundle_version/],
      [{ target_device_ids: ['dep-1'] }, 400, /bundle_id|bundle_version/],
      [{ bundle_version: '7.0.0', target_device_ids: ['dep-1'], extra: 1 }, 400, /extra/],
    ];
    for (const [body, status, why] of cases) {
      const res = await tc.api.post('/deployments', body);
      expect({ body, status: res.status }).toEqual({ body, status });
      expect(res.body.message).toMatch(why);
    }
    const malformed = await tc.api.post('/deployments', '{"bundle_version": ');
    expect(malformed).toMatchObject({ status: 400, body: { error: 'invalid_json' } });
    expect(await storedState()).toEqual(before);
  });

  test('an HTTP-polling device gets the command in its heartbeat answer and reports over REST', async () => {
    const dev = await register('http-1');
    const other = await register('http-2');
    await tc.api.upload(await packBundle(scriptBundle('8.0.0', '/dev/null')));
    const created = await tc.api.post('/deployments', { bundle_version: '8.0.0', target_device_ids: ['http-1'] });
    const id = created.body.deployment_id;
    const device = tc.api.withToken(dev.body.token);

    const hb = await device.post('/devices/http-1/heartbeat', { status: 'online', bundle_version: null, uptime: 5 });
    expect(hb.status).toBe(200);
    expect(hb.body.commands).toEqual([expect.objectContaining({ type: 'deploy', deployment_id: id, bundle_version: '8.0.0' })]);
    expect((await tc.api.get('/devices/http-1')).body).toMatchObject({ status: 'online', connection: 'http' });

    // The device may download the bundle with its own token.
    const dl = await fetch(`${tc.controller.httpUrl}${hb.body.commands[0].url}`, { headers: { authorization: `Bearer ${dev.body.token}` } });
    expect(dl.status).toBe(200);

    const notTarget = await tc.api.withToken(other.body.token).post(`/deployments/${id}/result`, { device_id: 'http-2', status: 'success' });
    expect(notTarget.status).toBe(403);
    const impersonate = await tc.api.withToken(other.body.token).post(`/deployments/${id}/result`, { device_id: 'http-1', status: 'success' });
    expect(impersonate.status).toBe(403);
    const badStatus = await device.post(`/deployments/${id}/result`, { device_id: 'http-1', status: 'done' });
    expect(badStatus).toMatchObject({ status: 400, body: { message: expect.stringContaining('done') } });

    const ok = await device.post(`/deployments/${id}/result`, { device_id: 'http-1', status: 'success', duration_seconds: '2.5' });
    expect(ok.status).toBe(200);
    const again = await device.post(`/deployments/${id}/result`, { device_id: 'http-1', status: 'failed' });
    expect(again.body.recorded).toBe(false);

    const dep = (await tc.api.get(`/deployments/${id}`)).body;
    expect(dep).toMatchObject({ status: 'success', succeeded: 1, failed: 0 });
    expect((await tc.api.get('/devices/http-1')).body.current_bundle_version).toBe('8.0.0');
    const history = await tc.controller.services.repos.bundleHistory.find({ device_id: 'http-1' });
    expect(history).toEqual([expect.objectContaining({ status: 'success', duration_seconds: 2.5 })]);
    // Nothing left to do: the next heartbeat carries no command.
    expect((await device.post('/devices/http-1/heartbeat', {})).body.commands).toEqual([]);
  });

  test('unknown routes and deployments are 404 with the error shape', async () => {
    expect((await tc.api.get('/deployments/does-not-exist')).body).toMatchObject({ error: 'not_found' });
    expect((await tc.api.get('/nothing-here')).status).toBe(404);
  });
});

describe('fleet summary and filtered lists', () => {
  test('GET /summary counts devices as the list shows them, and running deployments', async () => {
    const ids = ['sum-1', 'sum-2', 'sum-3'];
    const tokens = await Promise.all(ids.map(async (id) => (await register(id)).body.token as string));
    // Two of them heartbeat over HTTP: online; the third never did: offline.
    for (const i of [0, 1]) expect((await tc.api.withToken(tokens[i]!).post(`/devices/${ids[i]}/heartbeat`, {})).status).toBe(200);
    await tc.api.upload(await packBundle(scriptBundle('8.5.0', '/dev/null')));
    const pending = await tc.api.post('/deployments', { bundle_version: '8.5.0', target_device_ids: ['sum-3'] });
    expect(pending.status).toBe(201);

    const all = (await tc.api.get('/devices')).body as Array<{ device_id: string; status: string }>;
    const by = (status: string) => all.filter((d) => d.status === status).map((d) => d.device_id);
    const summary = await tc.api.get('/summary');
    expect(summary.status).toBe(200);
    expect(summary.body).toEqual({
      devices: { total: all.length, online: by('online').length, offline: by('offline').length, error: by('error').length },
      deployments: { running: expect.any(Number) },
    });
    expect(by('online')).toEqual(expect.arrayContaining(['sum-1', 'sum-2']));
    expect(by('offline')).toContain('sum-3');

    // A status filter pages through the devices that match, not through all of them.
    const online = by('online');
    expect(online.length).toBeGreaterThanOrEqual(2);
    expect((await tc.api.get('/devices?status=online&limit=1')).body.map((d: { device_id: string }) => d.device_id)).toEqual(online.slice(0, 1));
    expect((await tc.api.get('/devices?status=online&skip=1&limit=1')).body.map((d: { device_id: string }) => d.device_id)).toEqual(online.slice(1, 2));

    const running = (await tc.api.get('/deployments?running=true&limit=1000')).body as Array<{ deployment_id: string; finished_at: string | null }>;
    expect(running.map((d) => d.deployment_id)).toContain(pending.body.deployment_id);
    expect(running.every((d) => d.finished_at === null)).toBe(true);
    expect(summary.body.deployments.running).toBe(running.length);
    const finished = (await tc.api.get('/deployments?running=false&limit=1000')).body as Array<{ finished_at: string | null }>;
    expect(finished.length).toBeGreaterThan(0);
    expect(finished.every((d) => d.finished_at !== null)).toBe(true);
    expect(await tc.api.get('/deployments?running=maybe')).toMatchObject({ status: 400, body: { error: 'invalid_request', message: 'running must be one of true, false' } });

    // A device may not read the fleet summary.
    expect((await tc.api.withToken(tokens[0]!).get('/summary')).status).toBe(403);
  });
});

describe('restart', () => {
  test('a restarted controller finds devices, bundles, deployments and history again', async () => {
    const before = await storedState();
    const history = await tc.controller.services.repos.bundleHistory.count({});
    expect(history).toBeGreaterThan(0);
    await tc.stop();
    tc = await startTestController({ dataDir: tc.dataDir });
    expect(await storedState()).toEqual(before);
    expect(await tc.controller.services.repos.bundleHistory.count({})).toBe(history);
    expect((await tc.api.get('/devices/http-1')).body.current_bundle_version).toBe('8.0.0');
  });
});
