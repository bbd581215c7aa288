// End to end over real sockets: an in-process controller, real agent
// processes, real bundles with real scripts.
import { mkdtemp, readFile, writeFile, readdir, stat } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { startTestController, waitFor, type TestController } from './support/controller.js';
import { startAgentProcess, type AgentProcess } from './support/agent.js';
import { packBundle, scriptBundle } from './support/bundles.js';
import { topics } from '../broker/index.js';

let tc: TestController;
let work: string;
const agents: AgentProcess[] = [];

beforeAll(async () => {
  tc = await startTestController();
  work = await mkdtemp(join(tmpdir(), 'kernex-e2e-'));
});

afterAll(async () => {
  await Promise.all(agents.map((a) => a.stop()));
  await tc.stop();
});

async function agent(deviceId: string): Promise<AgentProcess> {
  const a = await startAgentProcess({ deviceId, server: tc.controller.httpUrl, enrollmentToken: tc.creds.enrollment_token });
  agents.push(a);
  await waitFor(async () => (await tc.api.get(`/devices/${deviceId}`)).body.status === 'online', `${deviceId} online`)
    .catch((err: Error) => {
      throw new Error(`${err.message}\nagent output:\n${a.output()}`);
    });
  return a;
}

async function upload(version: string, out: string, opts: { exit?: number } = {}) {
  const res = await tc.api.upload(await packBundle(scriptBundle(version, out, opts)));
  expect(res.status).toBe(201);
  return res.body as { id: string; version: string; sha256: string; size: number };
}

async function deployAndWait(body: Record<string, unknown>) {
  const created = await tc.api.post('/deployments', body);
  expect(created.status).toBe(201);
  const id = created.body.deployment_id as string;
  return waitFor(async () => {
    const d = (await tc.api.get(`/deployments/${id}`)).body;
    return d.finished_at ? d : null;
  }, `deployment ${id} to finish`, 30_000);
}

test('a deploy runs the bundle script on the device and is recorded everywhere', async () => {
  const out = join(work, 'dev-ok.out');
  await agent('dev-ok');
  const bundle = await upload('1.0.0', out);

  const listed = await tc.api.get('/bundles');
  expect(listed.body.map((b: { version: string }) => b.version)).toContain('1.0.0');

  const started = Date.now();
  const dep = await deployAndWait({ bundle_version: '1.0.0', target_device_ids: ['dev-ok'] });
  const elapsed = Date.now() - started;
  process.stderr.write(`deploy to one device, end to end on loopback: ${elapsed} ms\n`);

  expect(dep.status).toBe('success');
  expect(dep.bundle_id).toBe(bundle.id);
  expect(dep.devices).toEqual([expect.objectContaining({ device_id: 'dev-ok', status: 'success', exit_code: 0 })]);
  expect(dep.devices[0].output_tail).toContain('deploying 1.0.0');
  expect(await readFile(out, 'utf8')).toBe('deploy 1.0.0\n');

  const device = (await tc.api.get('/devices/dev-ok')).body;
  expect(device.current_bundle_version).toBe('1.0.0');
  expect(device.last_heartbeat).toEqual(expect.any(String));
  expect(device.token_hash).toBeUndefined();

  const history = await tc.controller.services.repos.bundleHistory.find({ device_id: 'dev-ok' });
  expect(history).toEqual([expect.objectContaining({ bundle_version: '1.0.0', status: 'success', deployment_id: dep.deployment_id })]);
});

test('a failing script is reported failed with its exit code and output', async () => {
  const out = join(work, 'dev-fail.out');
  await agent('dev-fail');
  await upload('2.0.0-fail', out, { exit: 3 });
  const dep = await deployAndWait({ bundle_version: '2.0.0-fail', target_device_ids: ['dev-fail'] });
  expect(dep.status).toBe('failed');
  const state = dep.devices[0];
  expect(state).toMatchObject({ status: 'failed', exit_code: 3 });
  expect(state.error_message).toContain('exited with 3');
  expect(state.output_tail).toContain('deploying 2.0.0-fail');
  const device = (await tc.api.get('/devices/dev-fail')).body;
  expect(device.current_bundle_version).toBeNull();
  const history = await tc.controller.services.repos.bundleHistory.find({ device_id: 'dev-fail' });
  expect(history).toEqual([expect.objectContaining({ status: 'failed', bundle_version: '2.0.0-fail' })]);
});

test('a bundle whose bytes no longer match their sha256 fails before the script runs', async () => {
  const out = join(work, 'dev-sha.out');
  await agent('dev-sha');
  const bundle = await upload('3.0.0', out);
  // Corrupt the stored bytes behind the controller's back: same size, other content.
  const blob = join(tc.dataDir, 'blobs', bundle.id);
  const bytes = await readFile(blob);
  bytes[bytes.length - 10] ^= 0xff;
  await writeFile(blob, bytes);

  const dep = await deployAndWait({ bundle_id: bundle.id, target_device_ids: ['dev-sha'] });
  expect(dep.devices[0].status).toBe('failed');
  expect(dep.devices[0].error_message).toMatch(/sha256/i);
  expect(existsSync(out)).toBe(false);
});

test('a device offline when the deployment is created runs it when it comes back, once', async () => {
  const out = join(work, 'dev-late.out');
  const first = await agent('dev-late');
  await first.stop();
  await waitFor(async () => (await tc.api.get('/devices/dev-late')).body.status === 'offline', 'dev-late offline');

  await upload('4.0.0', out);
  const created = await tc.api.post('/deployments', { bundle_version: '4.0.0', target_device_ids: ['dev-late'] });
  expect(created.status).toBe(201);
  const id = created.body.deployment_id;
  await new Promise((r) => setTimeout(r, 300));
  expect((await tc.api.get(`/deployments/${id}`)).body.devices[0].status).toBe('pending');

  const again = await startAgentProcess({
    deviceId: 'dev-late', server: tc.controller.httpUrl, enrollmentToken: tc.creds.enrollment_token, dataDir: first.dataDir,
  });
  agents.push(again);
  const dep = await waitFor(async () => {
    const d = (await tc.api.get(`/deployments/${id}`)).body;
    return d.finished_at ? d : null;
  }, 'offline device to deploy', 30_000);
  expect(dep.status).toBe('success');
  expect(await readFile(out, 'utf8')).toBe('deploy 4.0.0\n');

  // Deliver the very same command again, as a QoS 1 redelivery or a resend would,
  // once the agent has recorded its outcome as acknowledged.
  await waitFor(async () => {
    const st = JSON.parse(await readFile(join(again.dataDir, 'state.json'), 'utf8'));
    return st.handled[id]?.reported === true && st.in_flight === null;
  }, 'the agent to record its outcome as reported');
  const bundle = (await tc.api.get('/bundles')).body.find((b: { version: string }) => b.version === '4.0.0');
  const answered = tc.controller.counters.results;
  await tc.controller.broker.publish(topics.commands('dev-late'), {
    type: 'deploy', command_id: id, deployment_id: id, bundle_id: bundle.id, bundle_version: '4.0.0',
    sha256: bundle.sha256, size: bundle.size, url: `/api/v1/bundles/${bundle.id}`, issued_at: new Date().toISOString(),
  });
  // Answered from the agent's record, which the controller receives (and
  // counts) but does not record again. Not judged by the agent's debug log:
  // the device's configuration (INFO by default) may have turned it off.
  await waitFor(() => tc.controller.counters.results > answered, 'the duplicate to be answered');
  expect(await readFile(out, 'utf8')).toBe('deploy 4.0.0\n');
  const history = await tc.controller.services.repos.bundleHistory.find({ device_id: 'dev-late' });
  expect(history).toHaveLength(1);
});

test('the agent keeps its bundle on disk and its state across restarts', async () => {
  const a = agents.find((x) => x.deviceId === 'dev-ok')!;
  const state = JSON.parse(await readFile(join(a.dataDir, 'state.json'), 'utf8'));
  expect(state.current_bundle_version).toBe('1.0.0');
  expect(Object.values(state.handled)).toEqual([expect.objectContaining({ reported: true })]);
  expect(await readdir(join(a.dataDir, 'bundles'))).toEqual(['1.0.0']);
  expect((await stat(join(a.dataDir, 'device-key.pem'))).mode & 0o777).toBe(0o600);
});
