// The fleet simulator against a real controller: 20 simulated devices, each a
// real MQTT connection with its own credentials, register, show online, get
// a deployment, download and verify the bundle, run its script, report.
import { execFile } from 'node:child_process';
import { mkdtemp, readFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { startTestController, waitFor, type TestController } from './support/controller.js';
import { packBundle, scriptBundle } from './support/bundles.js';
import { KERNEX_BIN } from './support/agent.js';
import { Fleet, registerDevices, deviceIds, brokerTarget, sourceAddresses, type DeviceCredentials } from '../sim/index.js';
import type { CommandResult } from '../schemas/index.js';

const run = promisify(execFile);
let tc: TestController;
let fleet: Fleet | undefined;

beforeAll(async () => {
  tc = await startTestController();
});
afterAll(async () => {
  await fleet?.end();
  await tc.stop();
});

test('20 simulated devices register, show online, and each runs a deployment and reports success', async () => {
  const n = 20;
  const creds: DeviceCredentials[] = await registerDevices({
    server: tc.controller.httpUrl, enrollmentToken: tc.creds.enrollment_token, ids: deviceIds('simtest', n), concurrency: 8,
  });
  expect(creds.map((c) => c.device_id)).toEqual(deviceIds('simtest', n));
  expect(new Set(creds.map((c) => c.token)).size).toBe(n);

  const results: Array<{ device: string; result: CommandResult }> = [];
  const received: string[] = [];
  fleet = await Fleet.create(creds, {
    server: tc.controller.httpUrl, runScripts: true,
    hooks: {
      command: (d) => received.push(d.id),
      result: (d, result) => results.push({ device: d.id, result }),
    },
  });
  const report = await fleet.connect(brokerTarget(creds[0]!.mqtt_url));
  expect(report).toMatchObject({ connected: n, failed: 0 });
  expect(report.connect.count).toBe(n);

  const online = await waitFor(async () => {
    const list = (await tc.api.get('/devices?status=online')).body as Array<{ device_id: string }>;
    return list.length === n ? list : null;
  }, 'every simulated device online');
  expect(online.map((d) => d.device_id).sort()).toEqual(deviceIds('simtest', n));

  fleet.startHeartbeats(200);
  await waitFor(async () => {
    const list = (await tc.api.get('/devices')).body as Array<{ last_heartbeat: string | null }>;
    return list.length === n && list.every((d) => d.last_heartbeat);
  }, 'a heartbeat from every device');

  const out = join(await mkdtemp(join(tmpdir(), 'kernex-sim-test-')), 'deploys.log');
  const upload = await tc.api.upload(await packBundle(scriptBundle('2.0.0', out)));
  expect(upload.status).toBe(201);
  const created = await tc.api.post('/deployments', { bundle_version: '2.0.0', target_device_ids: deviceIds('simtest', n) });
  expect(created.status).toBe(201);
  const id = created.body.deployment_id as string;

  const dep = await waitFor(async () => {
    const d = (await tc.api.get(`/deployments/${id}`)).body;
    return d.finished_at ? d : null;
  }, 'the deployment to finish', 30_000);
  expect(dep).toMatchObject({ status: 'success', total: n, succeeded: n, failed: 0 });
  expect(dep.devices).toHaveLength(n);
  for (const state of dep.devices) expect(state).toMatchObject({ status: 'success', exit_code: 0 });
  expect(dep.devices[0].output_tail).toContain('deploying 2.0.0');

  // Each device got the command once, ran the real script once, and said so
  // (the controller acknowledges a result once recorded: the last may still be on the way).
  await waitFor(() => results.length === n, 'every outcome acknowledged');
  expect(received.sort()).toEqual(deviceIds('simtest', n));
  expect(results.map((r) => r.device).sort()).toEqual(deviceIds('simtest', n));
  expect(results.every((r) => r.result.status === 'success' && r.result.deployment_id === id)).toBe(true);
  expect((await readFile(out, 'utf8')).trim().split('\n')).toEqual(Array(n).fill('deploy 2.0.0'));

  // The heartbeats now carry the new version, as the agent's do.
  await waitFor(async () => {
    const list = (await tc.api.get('/devices')).body as Array<{ current_bundle_version: string | null }>;
    return list.every((d) => d.current_bundle_version === '2.0.0');
  }, 'every device on 2.0.0');
  await fleet.end();
  fleet = undefined;
});

test('a command delivered again is answered from the record, not run twice', async () => {
  const creds = await registerDevices({
    server: tc.controller.httpUrl, enrollmentToken: tc.creds.enrollment_token, ids: ['simtest-dup'],
  });
  const results: CommandResult[] = [];
  fleet = await Fleet.create(creds, { server: tc.controller.httpUrl, runScripts: true, hooks: { result: (_d, r) => results.push(r) } });
  await fleet.connect(brokerTarget(creds[0]!.mqtt_url));
  const out = join(await mkdtemp(join(tmpdir(), 'kernex-sim-dup-')), 'deploys.log');
  expect((await tc.api.upload(await packBundle(scriptBundle('2.1.0', out)))).status).toBe(201);
  const created = await tc.api.post('/deployments', { bundle_version: '2.1.0', target_device_ids: ['simtest-dup'] });
  const stateId = `${created.body.deployment_id}:simtest-dup`;
  await waitFor(() => results.length === 1, 'the first outcome');

  // As if the outcome had been lost: the controller still thinks it pending
  // and re-sends the command, as it does when a device subscribes again.
  const states = tc.controller.services.repos.deviceDeployments;
  await states.updateOne({ _id: stateId }, { $set: { status: 'pending' } });
  await tc.controller.services.deployments.resendPending('simtest-dup');
  await waitFor(async () => (await states.findOne({ _id: stateId }))?.status === 'success', 'the recorded outcome sent again');
  expect(fleet.counters.commands).toBe(2);
  expect(await readFile(out, 'utf8')).toBe('deploy 2.1.0\n');
  await fleet.end();
  fleet = undefined;
});

test('kernex simulate runs a fleet from the command line', async () => {
  const { stdout } = await run(process.execPath, [
    KERNEX_BIN, 'simulate', '--devices', '5', '--prefix', 'cli', '--server', tc.controller.httpUrl,
    '--enrollment-token', tc.creds.enrollment_token, '--heartbeat', '1', '--duration', '2', '--log-level', 'info',
  ], { env: { ...process.env, KERNEX_LOG_JSON: '1' } });
  const lines = stdout.trim().split('\n').map((l) => JSON.parse(l) as Record<string, unknown>);
  expect(lines).toEqual(expect.arrayContaining([
    expect.objectContaining({ msg: 'devices registered', devices: 5 }),
    expect.objectContaining({ msg: 'devices connected', connected: 5, failed: 0 }),
  ]));
  const devices = (await tc.api.get('/devices')).body as Array<{ device_id: string; last_heartbeat: string | null }>;
  const cli = devices.filter((d) => d.device_id.startsWith('cli-'));
  expect(cli.map((d) => d.device_id)).toEqual(deviceIds('cli', 5));
  expect(cli.every((d) => d.last_heartbeat)).toBe(true);
});

test('a fleet larger than one source address can carry is spread over 127.0.0.x', () => {
  expect(sourceAddresses(1000, 25_000)).toBeUndefined();
  const spread = sourceAddresses(60_000, 25_000)!;
  expect([0, 1, 2, 3].map(spread)).toEqual(['127.0.0.2', '127.0.0.3', '127.0.0.4', '127.0.0.2']);
  expect(() => sourceAddresses(10_000_000, 1000)).toThrow(/source addresses/);
});

test('devices connect from the source addresses they were given', async () => {
  const creds = await registerDevices({
    server: tc.controller.httpUrl, enrollmentToken: tc.creds.enrollment_token, ids: deviceIds('simaddr', 4),
  });
  fleet = await Fleet.create(creds, { server: tc.controller.httpUrl, perSourceAddress: 2 });
  const report = await fleet.connect(brokerTarget(creds[0]!.mqtt_url));
  expect(report.connected).toBe(4);
  const locals = fleet.devices.map((d) => (d.client!.stream as unknown as { localAddress: string }).localAddress);
  expect(locals).toEqual(['127.0.0.2', '127.0.0.3', '127.0.0.2', '127.0.0.3']);
  await fleet.end();
  fleet = undefined;
});
