// Device configuration: the REST API, and what real agents do with it (the
// heartbeat interval, log level and deploy timeout change at once; a device
// that was away gets the latest version only).
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { startTestController, waitFor, type TestController } from './support/controller.js';
import { startAgentProcess, type AgentProcess } from './support/agent.js';
import { packBundle } from './support/bundles.js';
import { hasProgram } from './support/programs.js';
import { mosquittoSub } from './support/mosquitto.js';
import { expectShape } from './support/shapes.js';
import { validate } from '../schemas/index.js';
import { topics } from '../broker/index.js';
import { deviceKey, proof } from './support/devices.js';

let tc: TestController;
const agents: AgentProcess[] = [];

beforeAll(async () => {
  tc = await startTestController();
});
afterAll(async () => {
  await Promise.all(agents.map((a) => a.stop()));
  await tc.stop();
});

async function register(deviceId: string): Promise<string> {
  const key = deviceKey();
  const res = await tc.api.withToken(undefined).post('/devices/register', {
    device_id: deviceId, public_key: key.publicKeyPem, enrollment_token: tc.creds.enrollment_token, ...proof(key, deviceId),
  });
  expect(res.status).toBe(201);
  return res.body.token as string;
}

async function agent(deviceId: string, dataDir?: string): Promise<AgentProcess> {
  const a = await startAgentProcess({ deviceId, server: tc.controller.httpUrl, enrollmentToken: tc.creds.enrollment_token, dataDir });
  agents.push(a);
  await waitFor(async () => (await tc.api.get(`/devices/${deviceId}`)).body.status === 'online', `${deviceId} online`)
    .catch((err: Error) => {
      throw new Error(`${err.message}\nagent output:\n${a.output()}`);
    });
  return a;
}

async function config(deviceId: string) {
  const res = await tc.api.get(`/devices/${deviceId}/config`);
  expect(res.status).toBe(200);
  return expectShape(validate.deviceConfigView, res.body);
}

async function put(deviceId: string, body: unknown) {
  const res = await tc.api.put(`/devices/${deviceId}/config`, body);
  expect({ status: res.status, body: res.body }).toMatchObject({ status: 200 });
  return expectShape(validate.deviceConfigView, res.body);
}

/** The JSON log lines of an agent with a given message. */
function logged(a: AgentProcess, msg: string): Array<Record<string, unknown>> {
  return a.output().split('\n').flatMap((line) => {
    try {
      const entry = JSON.parse(line) as Record<string, unknown>;
      return entry.msg === msg ? [entry] : [];
    } catch {
      return [];
    }
  });
}

describe('GET and PUT /devices/{id}/config', () => {
  test('the first read creates the defaults, version 1', async () => {
    await register('cfg-rest');
    const first = await config('cfg-rest');
    expect(first).toMatchObject({
      device_id: 'cfg-rest', polling_interval: 60, heartbeat_timeout: 30, deploy_timeout: 300, log_level: 'INFO',
      metadata_json: null, version: 1,
    });
    expect(await config('cfg-rest')).toEqual(first);
  });

  test('versions 1, 2, 3, 4: only the fields given change, numbers stay numbers (numeric strings accepted)', async () => {
    const v1 = await config('cfg-rest');
    const v2 = await put('cfg-rest', { polling_interval: '120', log_level: 'DEBUG' });
    expect(v2).toMatchObject({ version: 2, polling_interval: 120, log_level: 'DEBUG', heartbeat_timeout: 30, deploy_timeout: 300 });
    const v3 = await put('cfg-rest', { heartbeat_timeout: '45', deploy_timeout: 600, metadata_json: { site: 'dc-2', rack: { row: 3 } } });
    expect(v3).toMatchObject({ version: 3, polling_interval: 120, heartbeat_timeout: 45, deploy_timeout: 600, log_level: 'DEBUG',
      metadata_json: { site: 'dc-2', rack: { row: 3 } } });
    const v4 = await put('cfg-rest', { log_level: 'warning', metadata_json: null });
    expect(v4).toMatchObject({ version: 4, log_level: 'WARNING', metadata_json: null, polling_interval: 120 });
    expect([v1.version, v2.version, v3.version, v4.version]).toEqual([1, 2, 3, 4]);
    expect(v4.created_at).toBe(v1.created_at);
    expect(v4.updated_at > v1.updated_at).toBe(true);
    expect(await config('cfg-rest')).toEqual(v4);
  });

  test('an update of a device never read starts from the defaults: version 2', async () => {
    await register('cfg-fresh');
    expect(await put('cfg-fresh', { deploy_timeout: 10 })).toMatchObject({ version: 2, deploy_timeout: 10, polling_interval: 60 });
  });

  test('concurrent updates each get their own version', async () => {
    const start = (await config('cfg-rest')).version;
    const results = await Promise.all(Array.from({ length: 12 }, (_, i) => put('cfg-rest', { polling_interval: 100 + i })));
    const versions = results.map((r) => r.version).sort((a, b) => a - b);
    expect(versions).toEqual(Array.from({ length: 12 }, (_, i) => start + 1 + i));
    expect((await config('cfg-rest')).version).toBe(start + 12);
  });

  test.each([
    ['zero', { polling_interval: 0 }, /polling_interval/],
    ['too large', { deploy_timeout: 86401 }, /deploy_timeout/],
    ['not a number', { polling_interval: 'soon' }, /polling_interval/],
    ['a fraction', { heartbeat_timeout: '2.5' }, /heartbeat_timeout/],
    ['a boolean', { polling_interval: true }, /polling_interval/],
    ['a null number', { deploy_timeout: null }, /deploy_timeout/],
    ['an unknown log level', { log_level: 'TRACE' }, /log_level/],
    ['an unknown field', { polling: 5 }, /polling/],
    ['an empty body', {}, /fewer than 1|at least 1|minProperties|must NOT have fewer/],
    ['not an object', [1, 2], /object/],
    ['a metadata key with $', { metadata_json: { $where: 'x' } }, /\$where/],
    ['a metadata key with a dot', { metadata_json: { a: { 'b.c': 1 } } }, /b\.c/],
  ])('refuses %s with 400 and keeps the version', async (_name, body, why) => {
    const before = await config('cfg-rest');
    const res = await tc.api.put('/devices/cfg-rest/config', body);
    expect(res.status).toBe(400);
    expect(res.body).toEqual({ error: 'invalid_request', message: expect.stringMatching(why) });
    expect(await config('cfg-rest')).toEqual(before);
  });

  test('malformed JSON is 400', async () => {
    const res = await tc.api.put('/devices/cfg-rest/config', '{"polling_interval": ');
    expect(res).toMatchObject({ status: 400, body: { error: 'invalid_json' } });
  });

  test('an unknown device is 404 and nothing is stored', async () => {
    const before = await tc.controller.services.repos.deviceConfigs.count({});
    expect((await tc.api.get('/devices/ghost/config')).body).toMatchObject({ error: 'not_found', message: expect.stringContaining('ghost') });
    expect((await tc.api.put('/devices/ghost/config', { polling_interval: 5 })).status).toBe(404);
    expect(await tc.controller.services.repos.deviceConfigs.count({})).toBe(before);
  });

  test('a viewer reads but may not update; a device reads only its own', async () => {
    const { token } = await tc.controller.services.tokens.create('viewer', 'dash');
    expect((await tc.api.withToken(token).get('/devices/cfg-rest/config')).status).toBe(200);
    expect((await tc.api.withToken(token).put('/devices/cfg-rest/config', { polling_interval: 5 })).status).toBe(403);
    const deviceToken = await register('cfg-self');
    expect((await tc.api.withToken(deviceToken).get('/devices/cfg-self/config')).status).toBe(200);
    expect((await tc.api.withToken(deviceToken).get('/devices/cfg-rest/config')).status).toBe(403);
    expect((await tc.api.withToken(deviceToken).put('/devices/cfg-self/config', { polling_interval: 5 })).status).toBe(403);
  });

  test('the HTTP heartbeat carries a configure command while the device is behind, and not after', async () => {
    const token = await register('cfg-http');
    const device = tc.api.withToken(token);
    expect((await device.post('/devices/cfg-http/heartbeat', { config_version: 0 })).body.commands).toEqual([]);
    await put('cfg-http', { polling_interval: '120', heartbeat_timeout: '45', deploy_timeout: '600', log_level: 'DEBUG' });
    const hb = await device.post('/devices/cfg-http/heartbeat', { config_version: 0 });
    expectShape(validate.heartbeatResponse, hb.body);
    expect(hb.body.commands).toEqual([{
      type: 'configure', command_id: 'config-2', config_version: 2, polling_interval: 120, heartbeat_timeout: 45,
      deploy_timeout: 600, log_level: 'DEBUG', metadata_json: null, issued_at: expect.any(String),
    }]);
    expect((await device.post('/devices/cfg-http/heartbeat', { config_version: 2 })).body.commands).toEqual([]);
    await waitFor(async () => (await tc.api.get('/devices/cfg-http')).body.config_applied === true, 'config_applied');
    expect((await tc.api.get('/devices/cfg-http')).body).toMatchObject({ config_version: 2, desired_config_version: 2 });
  });

  test('an HTTP device polling every 120 s stays online between polls; one on the default 60 s goes offline after 90 s', async () => {
    const slow = tc.api.withToken(await register('cfg-slowpoll'));
    const usual = tc.api.withToken(await register('cfg-usualpoll'));
    await put('cfg-slowpoll', { polling_interval: 120 });
    await slow.post('/devices/cfg-slowpoll/heartbeat', { config_version: 2 });
    await usual.post('/devices/cfg-usualpoll/heartbeat', {});
    const { devices } = tc.controller.services;
    await devices.sweep(Date.now() + 100_000);
    expect((await tc.api.get('/devices/cfg-slowpoll')).body.status).toBe('online');
    expect((await tc.api.get('/devices/cfg-usualpoll')).body.status).toBe('offline');
    await devices.sweep(Date.now() + 361_000);
    expect((await tc.api.get('/devices/cfg-slowpoll')).body.status).toBe('offline');
  });
});

const withMosquitto = hasProgram('mosquitto_sub');
(withMosquitto ? describe : describe.skip)('a running agent', () => {
  test('applies each version at once: heartbeat interval 1 s then 3 s, then log level and deploy timeout', async () => {
    const a = await agent('cfg-live');
    const sub = mosquittoSub(tc.controller.mqttPort, tc.creds.token, ['kernex/devices/cfg-live/heartbeat']);
    const beats = (version: number) => sub.json().filter((hb) => hb.config_version === version);
    const gaps = (version: number) => beats(version).slice(1).map((hb, i) => hb.at - beats(version)[i]!.at);
    try {
      expect((await config('cfg-live')).version).toBe(1);
      await waitFor(() => beats(1).length >= 1, 'a heartbeat with version 1');

      const sent = Date.now() / 1000;
      expect((await put('cfg-live', { polling_interval: '1' })).version).toBe(2);
      await waitFor(() => beats(2).length >= 4, 'four heartbeats with version 2', 15_000);
      process.stderr.write(`configuration PUT to the first heartbeat reporting it (seen by mosquitto_sub): ${
        Math.round((beats(2)[0]!.at - sent) * 1000)} ms\n`);
      expect((await put('cfg-live', { polling_interval: 3 })).version).toBe(3);
      await waitFor(() => beats(3).length >= 3, 'three heartbeats with version 3', 20_000);

      process.stderr.write(`heartbeat gaps at 1 s: ${gaps(2).map((g) => g.toFixed(2)).join(', ')}; ` +
        `at 3 s: ${gaps(3).map((g) => g.toFixed(2)).join(', ')}\n`);
      for (const g of gaps(2)) expect(g).toBeGreaterThan(0.5), expect(g).toBeLessThan(2);
      for (const g of gaps(3)) expect(g).toBeGreaterThan(2.2), expect(g).toBeLessThan(4.5);

      const view = (await tc.api.get('/devices/cfg-live')).body;
      expectShape(validate.deviceView, view);
      expect(view).toMatchObject({ config_version: 3, desired_config_version: 3, config_applied: true });
    } finally {
      await sub.stop();
    }

    // Version 4: only errors logged from now on, and scripts get 1 s.
    const logLinesBefore = a.output().split('\n').length;
    expect((await put('cfg-live', { log_level: 'ERROR', deploy_timeout: '1' })).version).toBe(4);
    await waitFor(async () => (await tc.api.get('/devices/cfg-live')).body.config_applied === true, 'version 4 applied');
    const state = JSON.parse(await readFile(join(a.dataDir, 'state.json'), 'utf8'));
    expect(state).toMatchObject({ config_version: 4, polling_interval: 3, deploy_timeout: 1, log_level: 'ERROR' });

    const slow = await packBundle({
      manifest: { version: '1.0.0-slow', deploy: { script: 'deploy.sh' } }, files: { 'deploy.sh': '#!/bin/sh\nsleep 10\n' },
    });
    expect((await tc.api.upload(slow)).status).toBe(201);
    const created = await tc.api.post('/deployments', { bundle_version: '1.0.0-slow', target_device_ids: ['cfg-live'] });
    const dep = await waitFor(async () => {
      const d = (await tc.api.get(`/deployments/${created.body.deployment_id}`)).body;
      return d.finished_at ? d : null;
    }, 'the slow deploy to finish', 20_000);
    expect(dep.devices[0]).toMatchObject({ status: 'failed', error_message: expect.stringContaining('timed out after 1 s') });
    // The agent logs a finished deploy at info: not any more.
    const after = a.output().split('\n').slice(logLinesBefore).filter((l) => l.startsWith('{'));
    expect(after.filter((l) => /"level":(10|20|30)\b/.test(l))).toEqual([]);
  });

  test('metadata_json reaches the device\'s scripts as KERNEX_METADATA_JSON', async () => {
    const a = await agent('cfg-meta');
    const metadata = { site: 'dc-2', rack: { row: 3 }, note: 'quotes " and spaces' };
    expect((await put('cfg-meta', { metadata_json: metadata })).version).toBe(2);
    await waitFor(async () => (await tc.api.get('/devices/cfg-meta')).body.config_applied === true, 'version 2 applied');
    const seen = join(a.dataDir, 'metadata-seen.json');
    const bundle = await packBundle({
      manifest: { version: '1.0.0-meta', deploy: { script: 'deploy.sh' } },
      files: { 'deploy.sh': `#!/bin/sh\nprintf '%s' "$KERNEX_METADATA_JSON" > "${seen}"\n` },
    });
    expect((await tc.api.upload(bundle)).status).toBe(201);
    const created = await tc.api.post('/deployments', { bundle_version: '1.0.0-meta', target_device_ids: ['cfg-meta'] });
    await waitFor(async () => (await tc.api.get(`/deployments/${created.body.deployment_id}`)).body.status === 'success', 'the deploy');
    expect(JSON.parse(await readFile(seen, 'utf8'))).toEqual(metadata);
  });

  test('the retained config message holds the latest version for any subscriber', async () => {
    const sub = mosquittoSub(tc.controller.mqttPort, tc.creds.token, ['kernex/devices/cfg-rest/config']);
    try {
      await waitFor(() => sub.seen.length >= 1, 'the retained config', 10_000);
      const latest = (await config('cfg-rest')).version;
      expect(sub.json()[0]).toMatchObject({ config_version: latest });
      expectShape(validate.deviceConfig, JSON.parse(sub.seen[0]!.payload));
    } finally {
      await sub.stop();
    }
  });
});

describe('a device that was offline', () => {
  test('gets version 4, and never 2 or 3, when it reconnects', async () => {
    const first = await agent('cfg-away');
    expect((await config('cfg-away')).version).toBe(1);
    await waitFor(async () => (await tc.api.get('/devices/cfg-away')).body.config_version === 1, 'version 1 applied');
    await first.stop();
    await waitFor(async () => (await tc.api.get('/devices/cfg-away')).body.status === 'offline', 'cfg-away offline');

    await put('cfg-away', { polling_interval: 2 });
    await put('cfg-away', { polling_interval: 3, log_level: 'WARNING' });
    expect((await put('cfg-away', { polling_interval: 1, log_level: 'DEBUG' })).version).toBe(4);
    expect((await tc.api.get('/devices/cfg-away')).body).toMatchObject({ config_version: 1, desired_config_version: 4, config_applied: false });

    const again = await agent('cfg-away', first.dataDir);
    await waitFor(async () => (await tc.api.get('/devices/cfg-away')).body.config_applied === true, 'version 4 applied', 15_000);
    expect((await tc.api.get('/devices/cfg-away')).body).toMatchObject({ config_version: 4, desired_config_version: 4 });
    // Everything that reached the agent since it came back was version 4.
    await new Promise((r) => setTimeout(r, 500));
    const applied = logged(again, 'configuration applied').map((e) => e.version);
    const ignored = logged(again, 'stale configuration ignored').map((e) => e.version);
    expect(applied).toEqual([4]);
    expect(ignored.every((v) => v === 4)).toBe(true);
    const state = JSON.parse(await readFile(join(again.dataDir, 'state.json'), 'utf8'));
    expect(state).toMatchObject({ config_version: 4, polling_interval: 1, log_level: 'DEBUG' });
  });

  test('gets the latest version even when the controller restarted meanwhile', async () => {
    const a = agents.find((x) => x.deviceId === 'cfg-away' && x.child.exitCode === null)!;
    await a.stop();
    await waitFor(async () => (await tc.api.get('/devices/cfg-away')).body.status === 'offline', 'cfg-away offline');
    expect((await put('cfg-away', { polling_interval: 2 })).version).toBe(5);

    // The broker keeps retained messages in memory: a restart loses them, and
    // the controller publishes every stored configuration again.
    await Promise.all(agents.map((x) => x.stop()));
    const { httpPort, mqttPort } = tc.controller;
    await tc.stop();
    tc = await startTestController({ dataDir: tc.dataDir, httpPort, mqttPort });

    const back = await agent('cfg-away', a.dataDir);
    await waitFor(async () => (await tc.api.get('/devices/cfg-away')).body.config_version === 5, 'version 5 applied', 15_000);
    expect(logged(back, 'configuration applied').map((e) => e.version)).toEqual([5]);
  });

  test('a running agent ignores a configuration not newer than the one it applied, whichever way it comes', async () => {
    const a = agents.find((x) => x.deviceId === 'cfg-away' && x.child.exitCode === null)!;
    const older = { config_version: 3, polling_interval: 60, heartbeat_timeout: 30, deploy_timeout: 300, log_level: 'ERROR' as const };
    await tc.controller.broker.publish(topics.config('cfg-away'), older, { qos: 1 });
    await tc.controller.broker.publish(topics.commands('cfg-away'), { type: 'configure', command_id: 'config-5', ...older, config_version: 5 });
    await waitFor(() => logged(a, 'stale configuration ignored').some((e) => e.version === 5), 'the same version to be ignored');
    await waitFor(() => logged(a, 'stale configuration ignored').some((e) => e.version === 3), 'the older version to be ignored');
    expect(logged(a, 'configuration applied').map((e) => e.version)).toEqual([5]);
    const state = JSON.parse(await readFile(join(a.dataDir, 'state.json'), 'utf8'));
    expect(state).toMatchObject({ config_version: 5, polling_interval: 2, log_level: 'DEBUG' });
  });
});
