// Rollback end to end: real agent processes, real bundles with deploy and
// rollback scripts, the history as GET /devices/{id}/bundle-history shows it.
import { mkdtemp, readFile, readdir, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import mqtt from 'mqtt';
import { startTestController, waitFor, type TestController } from './support/controller.js';
import { startAgentProcess, type AgentProcess } from './support/agent.js';
import { packBundle, scriptBundle } from './support/bundles.js';
import { validate } from '../schemas/index.js';
import { expectShape } from './support/shapes.js';

let tc: TestController;
let work: string;
const agents: AgentProcess[] = [];

beforeAll(async () => {
  tc = await startTestController();
  work = await mkdtemp(join(tmpdir(), 'kernex-rollback-'));
});

afterAll(async () => {
  await Promise.all(agents.map((a) => a.stop()));
  await tc.stop();
});

async function agent(deviceId: string, extraArgs: string[] = []): Promise<AgentProcess> {
  const a = await startAgentProcess({
    deviceId, server: tc.controller.httpUrl, enrollmentToken: tc.creds.enrollment_token, extraArgs,
  });
  agents.push(a);
  await waitFor(async () => (await tc.api.get(`/devices/${deviceId}`)).body.status === 'online', `${deviceId} online`)
    .catch((err: Error) => {
      throw new Error(`${err.message}\nagent output:\n${a.output()}`);
    });
  return a;
}

async function upload(version: string, out: string, opts: { exit?: number; rollback?: boolean } = {}) {
  const res = await tc.api.upload(await packBundle(scriptBundle(version, out, opts)));
  expect(res.status).toBe(201);
  return res.body as { id: string; version: string };
}

async function finished(id: string) {
  return waitFor(async () => {
    const d = (await tc.api.get(`/deployments/${id}`)).body;
    return d.finished_at ? d : null;
  }, `deployment ${id} to finish`, 30_000);
}

async function deploy(version: string, deviceIds: string[]) {
  const res = await tc.api.post('/deployments', { bundle_version: version, target_device_ids: deviceIds });
  expect(res.status).toBe(201);
  return finished(res.body.deployment_id);
}

async function history(deviceId: string, query = '') {
  const res = await tc.api.get(`/devices/${deviceId}/bundle-history${query}`);
  expect(res.status).toBe(200);
  for (const entry of res.body) expectShape(validate.bundleHistoryEntry, entry);
  return res.body as Array<Record<string, any>>;
}

/** Heartbeats of one device as an operator sees them over MQTT. */
async function watchHeartbeats(deviceId: string) {
  const client = await mqtt.connectAsync(tc.controller.mqttUrl, {
    clientId: `watch-${deviceId}`, username: 'ops', password: tc.creds.token, protocolVersion: 4,
  });
  const seen: Array<Record<string, unknown>> = [];
  client.on('message', (_t, payload) => seen.push(JSON.parse(payload.toString())));
  await client.subscribeAsync(`kernex/devices/${deviceId}/heartbeat`, { qos: 0 });
  return { seen, close: () => client.endAsync() };
}

test('v1, v2, rollback to v1: the agent runs v1\'s rollback script from its disk, the device reports v1, v2 is rolled_back', async () => {
  const out = join(work, 'rb-1.out');
  await agent('rb-1');
  const v1 = await upload('1.0.0', out, { rollback: true });
  await upload('2.0.0', out, { rollback: true });

  const d1 = await deploy('1.0.0', ['rb-1']);
  expect(d1.status).toBe('success');
  const d2 = await deploy('2.0.0', ['rb-1']);
  expect(d2.status).toBe('success');
  expect((await tc.api.get('/devices/rb-1')).body.current_bundle_version).toBe('2.0.0');

  // The controller's copy of v1 is gone: the rollback must use the agent's own.
  await rm(join(tc.dataDir, 'blobs', v1.id));
  expect((await tc.api.get(`/bundles/${v1.id}`)).status).not.toBe(200);

  const watch = await watchHeartbeats('rb-1');
  try {
    const res = await tc.api.post('/devices/rollback', { bundle_version: '1.0.0', target_device_ids: ['rb-1'] });
    expect(res.status).toBe(201);
    expectShape(validate.rollbackResponse, res.body);
    expect(res.body).toMatchObject({ status: 'pending', kind: 'rollback', bundle_version: '1.0.0', target_device_ids: ['rb-1'] });
    const rb = await finished(res.body.deployment_id);
    expect(rb).toMatchObject({ kind: 'rollback', status: 'success', succeeded: 1 });
    process.stderr.write(`rollback of one device from its own disk, created to finished: ${Date.parse(rb.finished_at) - Date.parse(rb.created_at)} ms\n`);
    expect(rb.devices[0].output_tail).not.toMatch(/deploying/);

    // v1's rollback script ran, after the two deploy scripts.
    expect(await readFile(out, 'utf8')).toBe('deploy 1.0.0\ndeploy 2.0.0\nrollback 1.0.0\n');

    // The device itself reports v1 in its heartbeats, and the controller shows it.
    await waitFor(() => watch.seen.some((hb) => hb.bundle_version === '1.0.0'), 'a heartbeat reporting 1.0.0');
    expect((await tc.api.get('/devices/rb-1')).body.current_bundle_version).toBe('1.0.0');

    const entries = await history('rb-1');
    expect(entries.map((e) => [e.kind, e.bundle_version, e.status])).toEqual([
      ['rollback', '1.0.0', 'success'],
      ['deploy', '2.0.0', 'rolled_back'],
      ['deploy', '1.0.0', 'success'],
    ]);
    expect(entries.map((e) => e.deployment_id)).toEqual([rb.deployment_id, d2.deployment_id, d1.deployment_id]);
    expect(entries[0]!.replaced_entry_id).toBe(entries[1]!.id);
    expect(entries[1]!.rolled_back_by).toBe(rb.deployment_id);
    expect(entries[0]!.deployed_at > entries[1]!.deployed_at && entries[1]!.deployed_at > entries[2]!.deployed_at).toBe(true);
  } finally {
    await watch.close();
  }

  // v2 worked here before it was replaced, so rolling back to it is allowed,
  // and it replaces the rollback to v1 (what the device runs now), nothing else.
  const res = await tc.api.post('/devices/rollback', { bundle_version: '2.0.0', target_device_ids: ['rb-1'] });
  expect(res.status).toBe(201);
  expect((await finished(res.body.deployment_id)).status).toBe('success');
  expect((await history('rb-1')).map((e) => [e.kind, e.bundle_version, e.status])).toEqual([
    ['rollback', '2.0.0', 'success'],
    ['rollback', '1.0.0', 'rolled_back'],
    ['deploy', '2.0.0', 'rolled_back'],
    ['deploy', '1.0.0', 'success'],
  ]);
});

test('a bundle without a rollback script rolls back with its deploy script', async () => {
  const out = join(work, 'rb-2.out');
  await agent('rb-2');
  await upload('3.0.0', out);
  await upload('3.1.0', out);
  expect((await deploy('3.0.0', ['rb-2'])).status).toBe('success');
  expect((await deploy('3.1.0', ['rb-2'])).status).toBe('success');
  const res = await tc.api.post('/devices/rollback', { bundle_version: '3.0.0', target_device_ids: ['rb-2'] });
  const rb = await finished(res.body.deployment_id);
  expect(rb.status).toBe('success');
  expect(rb.devices[0].output_tail).toContain('deploying 3.0.0');
  expect(await readFile(out, 'utf8')).toBe('deploy 3.0.0\ndeploy 3.1.0\ndeploy 3.0.0\n');
});

test('the agent keeps the last N bundles; a rollback to a pruned one downloads it again', async () => {
  const out = join(work, 'rb-3.out');
  const a = await agent('rb-3', ['--keep-bundles', '2']);
  for (const v of ['4.0.0', '4.1.0', '4.2.0']) {
    await upload(v, out, { rollback: true });
    expect((await deploy(v, ['rb-3'])).status).toBe('success');
  }
  expect((await readdir(join(a.dataDir, 'bundles'))).sort()).toEqual(['4.1.0', '4.2.0']);

  const res = await tc.api.post('/devices/rollback', { bundle_version: '4.0.0', target_device_ids: ['rb-3'] });
  expect((await finished(res.body.deployment_id)).status).toBe('success');
  expect(await readFile(out, 'utf8')).toMatch(/rollback 4\.0\.0\n$/);
  // 4.0.0 is back (just run), 4.2.0 stays as the one before; 4.1.0 is pruned.
  expect((await readdir(join(a.dataDir, 'bundles'))).sort()).toEqual(['4.0.0', '4.2.0']);
});

describe('refusals: 400 with the reason, nothing created', () => {
  const deploymentsCount = () => tc.controller.services.repos.deployments.count({});

  test.each([
    ['a version never deployed on that device', { bundle_version: '9.0.0', target_device_ids: ['rb-4'] }, 'no_successful_deployment', /rb-4.*never ran version 9\.0\.0/],
    ['a version whose deploy failed there', { bundle_version: '9.1.0-bad', target_device_ids: ['rb-4'] }, 'no_successful_deployment', /9\.1\.0-bad/],
    ['one of two devices never ran it', { bundle_version: '9.2.0', target_device_ids: ['rb-4', 'rb-5'] }, 'no_successful_deployment', /rb-5/],
    ['a nonexistent version', { bundle_version: '7.7.7', target_device_ids: ['rb-4'] }, 'unknown_bundle', /7\.7\.7 does not exist/],
    ['a nonexistent device', { bundle_version: '9.2.0', target_device_ids: ['rb-4', 'ghost'] }, 'unknown_device', /ghost/],
    ['no targets', { bundle_version: '9.2.0', target_device_ids: [] }, 'invalid_request', /target_device_ids/],
    ['no version', { target_device_ids: ['rb-4'] }, 'invalid_request', /bundle_version/],
    ['an unknown field', { bundle_version: '9.2.0', target_device_ids: ['rb-4'], force: true }, 'invalid_request', /force/],
  ])('%s', async (_name, body, code, why) => {
    if (!(await tc.controller.services.devices.exists('rb-4'))) {
      const out = join(work, 'rb-4.out');
      await agent('rb-4');
      await agent('rb-5');
      await upload('9.0.0', out);
      await upload('9.1.0-bad', out, { exit: 1 });
      await upload('9.2.0', out);
      expect((await deploy('9.1.0-bad', ['rb-4'])).status).toBe('failed');
      expect((await deploy('9.2.0', ['rb-4'])).status).toBe('success');
    }
    const before = await deploymentsCount();
    const res = await tc.api.post('/devices/rollback', body);
    expect(res.status).toBe(400);
    expect(res.body).toEqual({ error: code, message: expect.stringMatching(why) });
    expect(await deploymentsCount()).toBe(before);
  });

  test('a viewer may not roll back', async () => {
    const { token } = await tc.controller.services.tokens.create('viewer', 'dash');
    const res = await tc.api.withToken(token).post('/devices/rollback', { bundle_version: '9.2.0', target_device_ids: ['rb-4'] });
    expect(res.status).toBe(403);
  });
});

describe('GET /devices/{id}/bundle-history', () => {
  test('newest first, limit defaults to 20 and is at most 100', async () => {
    const repo = tc.controller.services.repos.bundleHistory;
    await tc.controller.services.repos.devices.insertOne({
      _id: 'hist-dev', device_id: 'hist-dev', public_key: 'k'.repeat(20), token_hash: null, status: 'offline', connection: null,
      last_heartbeat: null, current_bundle_version: null, config_version: null, uptime: null, metrics: null, hardware_id: null,
      metadata: null, revoked_at: null, created_at: new Date().toISOString(), updated_at: new Date().toISOString(),
    });
    await repo.insertMany(Array.from({ length: 120 }, (_, i) => ({
      _id: `dep-${i}:hist-dev`, device_id: 'hist-dev', bundle_version: `0.0.${i}`, bundle_id: 'b', deployment_id: `dep-${i}`,
      kind: 'deploy' as const, status: i % 7 === 0 ? 'failed' as const : 'success' as const, error_message: null,
      deployed_at: new Date(Date.UTC(2026, 0, 1, 0, 0, i)).toISOString(), duration_seconds: 1,
    })));
    const all = await history('hist-dev');
    expect(all).toHaveLength(20);
    expect(all[0]!.bundle_version).toBe('0.0.119');
    expect(all[19]!.bundle_version).toBe('0.0.100');
    expect(await history('hist-dev', '?limit=100')).toHaveLength(100);
    expect((await history('hist-dev', '?limit=3')).map((e) => e.bundle_version)).toEqual(['0.0.119', '0.0.118', '0.0.117']);
    for (const bad of ['101', '0', 'abc', '-1', '2.5']) {
      const res = await tc.api.get(`/devices/hist-dev/bundle-history?limit=${bad}`);
      expect(res).toMatchObject({ status: 400, body: { error: 'invalid_request', message: expect.stringMatching(/limit/) } });
    }
  });

  test('an unknown device is 404', async () => {
    expect((await tc.api.get('/devices/nobody/bundle-history')).body).toMatchObject({ error: 'not_found' });
  });
});
