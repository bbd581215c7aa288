// The HTTP fallback: a device that cannot hold an MQTT connection gets the
// same commands in its heartbeat answers and reports over REST; the real
// agent switches to it by itself when the broker is unreachable.
import { mkdtemp, readFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import mqtt from 'mqtt';
import { startTestController, waitFor, type TestController } from './support/controller.js';
import { startAgentProcess, type AgentProcess } from './support/agent.js';
import { packBundle, scriptBundle } from './support/bundles.js';
import { expectShape } from './support/shapes.js';
import { validate } from '../schemas/index.js';
import { registerDevice } from './support/devices.js';
import { freePort } from './support/ports.js';

let tc: TestController;
let work: string;
let closedPort: number;
const agents: AgentProcess[] = [];

beforeAll(async () => {
  tc = await startTestController();
  work = await mkdtemp(join(tmpdir(), 'kernex-http-'));
  // A port nothing listens on: the "unreachable broker".
  closedPort = await freePort();
});
afterAll(async () => {
  await Promise.all(agents.map((a) => a.stop()));
  await tc.stop();
});

async function httpAgent(deviceId: string): Promise<AgentProcess> {
  const a = await startAgentProcess({
    deviceId, server: tc.controller.httpUrl, enrollmentToken: tc.creds.enrollment_token,
    extraArgs: ['--mqtt-url', `mqtt://127.0.0.1:${closedPort}`],
  });
  agents.push(a);
  await waitFor(async () => {
    const d = (await tc.api.get(`/devices/${deviceId}`)).body;
    return d.status === 'online' && d.connection === 'http';
  }, `${deviceId} online over HTTP`).catch((err: Error) => {
    throw new Error(`${err.message}\nagent output:\n${a.output()}`);
  });
  return a;
}

async function finished(id: string) {
  return waitFor(async () => {
    const d = (await tc.api.get(`/deployments/${id}`)).body;
    return d.finished_at ? d : null;
  }, `deployment ${id} to finish`, 30_000);
}

test('an agent that cannot reach the broker deploys, applies config and rolls back over HTTP', async () => {
  const out = join(work, 'http-a.out');
  const a = await httpAgent('http-a');
  await waitFor(() => a.output().includes('MQTT unreachable: heartbeats and results go over HTTP'), 'the agent to say it uses HTTP');
  for (const v of ['1.0.0', '2.0.0']) expect((await tc.api.upload(await packBundle(scriptBundle(v, out, { rollback: true })))).status).toBe(201);

  for (const v of ['1.0.0', '2.0.0']) {
    const res = await tc.api.post('/deployments', { bundle_version: v, target_device_ids: ['http-a'] });
    const dep = await finished(res.body.deployment_id);
    expect(dep).toMatchObject({ status: 'success' });
    expect(dep.devices[0]).toMatchObject({ status: 'success', exit_code: 0 });
    expect(dep.devices[0].output_tail).toContain(`deploying ${v}`);
  }

  const cfg = await tc.api.put('/devices/http-a/config', { polling_interval: 1, deploy_timeout: 77 });
  expect(cfg.body.version).toBe(2);
  await waitFor(async () => (await tc.api.get('/devices/http-a')).body.config_applied === true, 'config applied over HTTP');
  expect(JSON.parse(await readFile(join(a.dataDir, 'state.json'), 'utf8'))).toMatchObject({ config_version: 2, deploy_timeout: 77 });

  const rb = await tc.api.post('/devices/rollback', { bundle_version: '1.0.0', target_device_ids: ['http-a'] });
  expect(rb.status).toBe(201);
  expect((await finished(rb.body.deployment_id)).status).toBe('success');
  expect(await readFile(out, 'utf8')).toBe('deploy 1.0.0\ndeploy 2.0.0\nrollback 1.0.0\n');
  const history = (await tc.api.get('/devices/http-a/bundle-history')).body;
  expect(history.map((e: { bundle_version: string; status: string }) => [e.bundle_version, e.status]))
    .toEqual([['1.0.0', 'success'], ['2.0.0', 'rolled_back'], ['1.0.0', 'success']]);
  expect((await tc.api.get('/devices/http-a')).body).toMatchObject({ current_bundle_version: '1.0.0', connection: 'http' });
});

test('a command repeated by every heartbeat answer while it runs is executed once', async () => {
  const out = join(work, 'http-b.out');
  await httpAgent('http-b');
  // Over HTTP there is no progress report, so the command stays pending and
  // every heartbeat answer (each second) carries it again while it runs.
  const slow = await packBundle({
    manifest: { version: '3.0.0-slow', deploy: { script: 'deploy.sh' } },
    files: { 'deploy.sh': `#!/bin/sh\necho run >> "${out}"\nsleep 3\n` },
  });
  expect((await tc.api.upload(slow)).status).toBe(201);
  const res = await tc.api.post('/deployments', { bundle_version: '3.0.0-slow', target_device_ids: ['http-b'] });
  expect((await finished(res.body.deployment_id)).status).toBe('success');
  await new Promise((r) => setTimeout(r, 1500));
  expect(await readFile(out, 'utf8')).toBe('run\n');
  expect((await tc.api.get('/devices/http-b/bundle-history')).body).toHaveLength(1);
});

test('an HTTP-polling device gets the very command an MQTT device gets, and reports over REST (403/400 enforced)', async () => {
  const mqttAgent = await startAgentProcess({ deviceId: 'push-c', server: tc.controller.httpUrl, enrollmentToken: tc.creds.enrollment_token });
  agents.push(mqttAgent);
  await waitFor(async () => (await tc.api.get('/devices/push-c')).body.status === 'online', 'push-c online');

  const reg = await registerDevice(tc.api, 'poll-c', tc.creds.enrollment_token);
  const device = tc.api.withToken(reg.body.token);

  const watcher = await mqtt.connectAsync(tc.controller.mqttUrl, { clientId: 'watch-cmds', username: 'ops', password: tc.creds.token });
  const pushed: unknown[] = [];
  watcher.on('message', (_t, p) => pushed.push(JSON.parse(p.toString())));
  await watcher.subscribeAsync('kernex/devices/push-c/commands', { qos: 1 });
  try {
    await tc.api.upload(await packBundle(scriptBundle('4.0.0', '/dev/null')));
    const created = await tc.api.post('/deployments', { bundle_version: '4.0.0', target_device_ids: ['push-c', 'poll-c'] });
    const id = created.body.deployment_id;
    await waitFor(() => pushed.length >= 1, 'the pushed command');

    const hb = await device.post('/devices/poll-c/heartbeat', { status: 'online', bundle_version: null, uptime: 3 });
    expectShape(validate.heartbeatResponse, hb.body);
    expect(hb.body.commands).toEqual([pushed[0]]);
    expect(hb.body.commands[0]).toMatchObject({ type: 'deploy', deployment_id: id, bundle_version: '4.0.0' });

    const outsider = await device.post(`/deployments/${id}/result`, { device_id: 'push-c', status: 'success' });
    expect(outsider).toMatchObject({ status: 403, body: { error: 'forbidden' } });
    const badStatus = await device.post(`/deployments/${id}/result`, { device_id: 'poll-c', status: 'in_progress' });
    expect(badStatus).toMatchObject({ status: 400, body: { message: expect.stringContaining('in_progress') } });
    const ok = await device.post(`/deployments/${id}/result`, { device_id: 'poll-c', status: 'success', duration_seconds: 1.5 });
    expect(ok.status).toBe(200);
    expectShape(validate.resultResponse, ok.body);

    const dep = await finished(id);
    expect(dep).toMatchObject({ status: 'success', succeeded: 2 });
    expect((await device.post('/devices/poll-c/heartbeat', {})).body.commands).toEqual([]);
  } finally {
    await watcher.endAsync();
  }
});
