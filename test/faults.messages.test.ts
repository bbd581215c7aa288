// Duplicate, stale, late and unknown messages, and the server-side deployment
// timeout: each is answered from a record or ignored and logged; nothing is
// executed twice, nothing recorded twice.
import { mkdtemp } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import mqtt from 'mqtt';
import { startTestController, waitFor, type TestController } from './support/controller.js';
import { startAgentProcess, type AgentProcess } from './support/agent.js';
import { packBundle, scriptBundle } from './support/bundles.js';
import { SimDevice } from './support/sim-device.js';
import { agentState, capturingLogger, readLines } from './support/faults.js';
import { topics } from '../broker/index.js';

let tc: TestController;
let work: string;
const log = capturingLogger();
const agents: AgentProcess[] = [];
const sims: SimDevice[] = [];

beforeAll(async () => {
  tc = await startTestController({ sweepIntervalMs: 100 }, log.logger);
  work = await mkdtemp(join(tmpdir(), 'kernex-faults-msg-'));
});

afterAll(async () => {
  await Promise.all(agents.map((a) => a.stop('SIGKILL')));
  await Promise.all(sims.map((s) => s.stop()));
  await tc.stop();
});

const logged = (msg: string) => log.lines().filter((l) => typeof l.msg === 'string' && l.msg.includes(msg));

async function agent(deviceId: string) {
  const a = await startAgentProcess({ deviceId, server: tc.controller.httpUrl, enrollmentToken: tc.creds.enrollment_token });
  agents.push(a);
  // Its first heartbeat follows its SUBSCRIBE on the same connection: commands published from here on reach it.
  await waitFor(async () => (await tc.api.get(`/devices/${deviceId}`)).body.last_heartbeat, `${deviceId}'s first heartbeat`);
  return a;
}

async function sim(deviceId: string, mode: 'succeed' | 'hold' = 'succeed', connect = true) {
  const d = await SimDevice.register(tc.controller.httpUrl, deviceId, tc.creds.enrollment_token, mode);
  sims.push(d);
  if (connect) {
    d.connect(tc.controller.mqttUrl);
    await waitFor(() => tc.controller.broker.isDeviceConnected(deviceId), `${deviceId} connected`);
  }
  return d;
}

async function upload(version: string, out = '/dev/null') {
  const res = await tc.api.upload(await packBundle(scriptBundle(version, out)));
  expect(res.status).toBe(201);
  return res.body as { id: string; sha256: string; size: number };
}

async function finished(id: string) {
  return waitFor(async () => {
    const d = (await tc.api.get(`/deployments/${id}`)).body;
    return d.finished_at ? d : null;
  }, `deployment ${id} to finish`, 30_000);
}

const history = (deviceId: string) => tc.controller.services.repos.bundleHistory.find({ device_id: deviceId });

/** Publishes a result as the device itself, and resolves once the controller acknowledged it (PUBACK). */
async function publishAsDevice(device: SimDevice, result: Record<string, unknown>): Promise<void> {
  const client = mqtt.connect(tc.controller.mqttUrl, {
    clientId: device.deviceId, username: device.deviceId, password: device.token, clean: true, reconnectPeriod: 0,
  });
  try {
    await new Promise<void>((resolve, reject) => {
      client.once('connect', () => resolve());
      client.once('error', reject);
    });
    await client.publishAsync(topics.results(device.deviceId), JSON.stringify(result), { qos: 1 });
  } finally {
    await client.endAsync();
  }
}

test('a redelivered deploy command is answered from the agent\'s record, not run again', async () => {
  const out = join(work, 'dup.out');
  const a = await agent('dup');
  const bundle = await upload('1.0.0', out);
  const created = await tc.api.post('/deployments', { bundle_version: '1.0.0', target_device_ids: ['dup'] });
  const id = created.body.deployment_id as string;
  await finished(id);
  await waitFor(async () => (await agentState(a.dataDir)).handled[id]?.reported, 'the outcome acknowledged');

  // The same command twice more, as a QoS 1 redelivery or a controller resend would bring it.
  const command = {
    type: 'deploy', command_id: id, deployment_id: id, bundle_id: bundle.id, bundle_version: '1.0.0',
    sha256: bundle.sha256, size: bundle.size, url: `/api/v1/bundles/${bundle.id}`, issued_at: new Date().toISOString(),
  };
  const before = logged('duplicate result ignored').length;
  const seen = (what: string) => a.output().split(what).length - 1;
  // While the agent still holds the original (its outcome can be acknowledged
  // before its handling ends, e.g. when a reconnect re-sent it), a duplicate
  // is folded into it; each one that was is sent again, as a controller would.
  const folded = () => seen('duplicate command ignored: already queued or running');
  let sent = 0;
  await waitFor(async () => {
    if (seen('duplicate command answered from record') >= 1) return true;
    if (sent === 0 || folded() >= sent) {
      sent++;
      await tc.controller.broker.publish(topics.commands('dup'), command);
    }
    return false;
  }, 'the redelivery answered from record').catch((err: Error) => {
    throw new Error(`${err.message}\nagent output:\n${a.output().slice(-6000)}`);
  });
  // The re-sent outcome reaches the controller and changes nothing.
  await waitFor(() => logged('duplicate result ignored').length >= before + 1, 'the re-sent outcome to be seen');
  // Again: answered from the record, or (while that answer is still awaiting
  // its acknowledgement) folded into it; never executed.
  await tc.controller.broker.publish(topics.commands('dup'), command);
  await waitFor(() => seen('duplicate command answered from record') + folded() >= sent + 1, 'the second redelivery handled');
  expect(await readLines(out)).toEqual(['deploy 1.0.0']);
  expect(await history('dup')).toHaveLength(1);
  const dep = (await tc.api.get(`/deployments/${id}`)).body;
  expect(dep).toMatchObject({ status: 'success', finished: 1, succeeded: 1 });
  expect(Object.keys((await agentState(a.dataDir)).handled)).toEqual([id]);
});

test('a configure older than the applied one is ignored (command and retained config)', async () => {
  const a = await agent('stale');
  const configure = (version: number, polling: number, deployTimeout: number) => ({
    type: 'configure', command_id: `cfg-${version}`, config_version: version, polling_interval: polling,
    deploy_timeout: deployTimeout, log_level: 'DEBUG', issued_at: new Date().toISOString(),
  });
  await tc.controller.broker.publish(topics.commands('stale'), configure(5, 2, 77));
  await waitFor(async () => (await agentState(a.dataDir)).config_version === 5, 'version 5 applied');
  // Older ones, as a command and as the retained config topic would deliver them.
  await tc.controller.broker.publish(topics.commands('stale'), configure(3, 30, 10));
  await tc.controller.broker.publish(topics.config('stale'), {
    config_version: 4, polling_interval: 40, heartbeat_timeout: 30, deploy_timeout: 20, log_level: 'INFO', metadata_json: null,
  }, { retain: true });
  await waitFor(() => a.output().split('stale configuration ignored').length - 1 === 2, 'both stale configurations ignored');
  const s = await agentState(a.dataDir);
  expect(s).toMatchObject({ config_version: 5, polling_interval: 2, deploy_timeout: 77, log_level: 'DEBUG' });
  // The heartbeats say so too.
  await waitFor(async () => (await tc.api.get('/devices/stale')).body.config_version === 5, 'heartbeat with config 5');
  // And a newer one still applies.
  await tc.controller.broker.publish(topics.commands('stale'), configure(6, 3, 88));
  await waitFor(async () => (await agentState(a.dataDir)).deploy_timeout === 88, 'version 6 applied');
});

test('a result for an unknown deployment is acknowledged, ignored and logged; nothing is stored', async () => {
  const d = await sim('stranger', 'succeed', false);
  const ignored = tc.controller.counters.ignored;
  await publishAsDevice(d, { deployment_id: 'no-such-deployment', status: 'success', exit_code: 0 });
  expect(tc.controller.counters.ignored).toBe(ignored + 1);
  expect(logged('result for an unknown deployment ignored').at(-1)).toMatchObject({
    deviceId: 'stranger', deploymentId: 'no-such-deployment',
  });
  expect(await history('stranger')).toEqual([]);
  expect(await tc.controller.services.repos.deviceDeployments.count({ device_id: 'stranger' })).toBe(0);
  expect((await tc.api.get('/devices/stranger')).body.current_bundle_version).toBeNull();
});

test('a result contradicting a finished deployment is ignored and logged; a repeat of it changes nothing', async () => {
  const d = await sim('finisher');
  await upload('2.0.0');
  const created = await tc.api.post('/deployments', { bundle_version: '2.0.0', target_device_ids: ['finisher'] });
  const id = created.body.deployment_id as string;
  const done = await finished(id);
  expect(done).toMatchObject({ status: 'success', finished: 1 });
  await d.drop(); // its session is taken over by the raw client below

  const ignored = tc.controller.counters.ignored;
  await publishAsDevice(d, { deployment_id: id, status: 'failed', exit_code: 1, error_message: 'late lie' });
  await publishAsDevice(d, { deployment_id: id, status: 'success', exit_code: 0 });
  expect(tc.controller.counters.ignored).toBe(ignored + 1);
  expect(logged('result for a finished deployment ignored').at(-1)).toMatchObject({
    deviceId: 'finisher', deploymentId: id, recorded: 'success', reported: 'failed',
  });
  const after = (await tc.api.get(`/deployments/${id}`)).body;
  expect(after).toMatchObject({ status: 'success', finished: 1, succeeded: 1, failed: 0, finished_at: done.finished_at });
  expect(after.devices[0]).toMatchObject({ status: 'success', error_message: null });
  expect(await history('finisher')).toEqual([expect.objectContaining({ deployment_id: id, status: 'success' })]);
});

describe('server-side deployment timeout', () => {
  test('devices that never report are timed_out once; the deployment finishes; a late result is ignored', async () => {
    const ok = await sim('t-ok');
    const silent = await sim('t-silent', 'hold');
    const offline = await sim('t-offline', 'succeed', false);
    await upload('3.0.0');
    const created = await tc.api.post('/deployments', {
      bundle_version: '3.0.0', target_device_ids: ['t-ok', 't-silent', 't-offline'], timeout_seconds: 1,
    });
    expect(created.status).toBe(201);
    const id = created.body.deployment_id as string;
    await waitFor(() => silent.holds(id), 't-silent to start the command');

    const dep = await finished(id);
    expect(dep).toMatchObject({ status: 'failed', total: 3, finished: 3, succeeded: 1, failed: 2, timed_out: 2, timeout_seconds: 1 });
    expect(Date.parse(dep.deadline_at) - Date.parse(dep.created_at)).toBe(1000);
    const states = Object.fromEntries(dep.devices.map((s: { device_id: string }) => [s.device_id, s]));
    expect(states['t-ok']).toMatchObject({ status: 'success', reason: null });
    for (const name of ['t-silent', 't-offline']) {
      expect(states[name]).toMatchObject({
        status: 'timed_out', reason: 'deployment_timeout',
        error_message: "no outcome reported within the deployment's timeout of 1 s",
      });
    }
    expect(states['t-silent'].started_at).toEqual(expect.any(String));
    expect(states['t-offline'].started_at).toBeNull();
    for (const name of ['t-silent', 't-offline']) {
      expect(await history(name)).toEqual([
        expect.objectContaining({ deployment_id: id, status: 'failed', error_message: expect.stringContaining('timeout') }),
      ]);
    }
    expect(await history('t-ok')).toHaveLength(1);

    // The silent device finishes after all: its result is acknowledged, ignored, logged.
    const ignored = tc.controller.counters.ignored;
    silent.release();
    await waitFor(() => tc.controller.counters.ignored === ignored + 1, 'the late result to be ignored');
    expect(logged('result for a finished deployment ignored').at(-1)).toMatchObject({
      deviceId: 't-silent', deploymentId: id, recorded: 'timed_out', reported: 'success',
    });
    const after = (await tc.api.get(`/deployments/${id}`)).body;
    expect(after).toMatchObject({ finished: 3, succeeded: 1, failed: 2, finished_at: dep.finished_at });
    expect(await history('t-silent')).toHaveLength(1);
    expect((await tc.api.get('/devices/t-silent')).body.current_bundle_version).toBeNull();

    // The offline device comes back: a timed-out command is not sent any more.
    offline.connect(tc.controller.mqttUrl);
    await waitFor(() => tc.controller.broker.isDeviceConnected('t-offline'), 't-offline connected');
    expect(await tc.controller.services.deployments.pendingCommands('t-offline')).toEqual([]);
    expect(offline.received).toEqual([]);
    expect(ok.executions.get(id)).toBe(1);
    expect(logged('device timed out').map((l) => l.deviceId).sort()).toEqual(['t-offline', 't-silent']);
  });

  test('a deployment is not finished while another device\'s final state is still being recorded', async () => {
    const { repos, deployments } = tc.controller.services;
    const at = new Date().toISOString();
    await repos.deployments.insertOne({
      _id: 'overlap', kind: 'deploy', bundle_id: 'b', bundle_version: '0.0.2', target_device_ids: ['o-a', 'o-b'],
      status: 'in_progress', total: 2, finished: 0, succeeded: 0, failed: 0, timed_out: 0, timeout_seconds: null,
      created_at: at, updated_at: at, finished_at: null,
    });
    const state = (deviceId: string) => ({
      _id: `overlap:${deviceId}`, deployment_id: 'overlap', device_id: deviceId, kind: 'deploy' as const, bundle_id: 'b',
      bundle_version: '0.0.2', status: 'in_progress' as const, phase: 'running' as const, exit_code: null, output_tail: null,
      error_message: null, reason: null, created_at: at, started_at: at, finished_at: null, duration_seconds: null, updated_at: at,
    });
    // o-a's result made its state final a moment ago; its history is being written.
    const a = { ...state('o-a'), status: 'failed' as const, phase: null, exit_code: 1, finished_at: at, finalizing: true };
    await repos.deviceDeployments.insertMany([a, state('o-b')]);

    // o-b's result, the last one, arrives meanwhile: not finished while o-a is unrecorded.
    expect(await deployments.recordResult('o-b', { deployment_id: 'overlap', status: 'success', exit_code: 0 })).toBe('recorded');
    expect((await tc.api.get('/deployments/overlap')).body).toMatchObject({ finished_at: null, finished: 1 });
    expect(await repos.bundleHistory.find({ deployment_id: 'overlap' })).toEqual([expect.objectContaining({ device_id: 'o-b' })]);

    // o-a's recording completes: now the deployment finishes, with both entries.
    await deployments.finalize([a], { count: true });
    expect((await tc.api.get('/deployments/overlap')).body)
      .toMatchObject({ status: 'failed', finished: 2, succeeded: 1, failed: 1, finished_at: expect.any(String) });
    expect((await repos.bundleHistory.find({ deployment_id: 'overlap' })).map((h) => h.device_id).sort()).toEqual(['o-a', 'o-b']);
    expect(await repos.deviceDeployments.count({ deployment_id: 'overlap', finalizing: true })).toBe(0);
  });

  test('the sweep at start finishes a deployment whose last state was recorded but never completed (a crash in between)', async () => {
    const { repos, sweeper } = tc.controller.services;
    const at = new Date().toISOString();
    await repos.deployments.insertOne({
      _id: 'uncompleted', kind: 'deploy', bundle_id: 'b', bundle_version: '0.0.3', target_device_ids: ['u-a'],
      status: 'in_progress', total: 1, finished: 1, succeeded: 1, failed: 0, timed_out: 0, timeout_seconds: null,
      created_at: at, updated_at: at, finished_at: null,
    });
    await repos.deviceDeployments.insertOne({
      _id: 'uncompleted:u-a', deployment_id: 'uncompleted', device_id: 'u-a', kind: 'deploy', bundle_id: 'b',
      bundle_version: '0.0.3', status: 'success', phase: null, exit_code: 0, output_tail: null, error_message: null,
      reason: null, created_at: at, started_at: at, finished_at: at, duration_seconds: 1, updated_at: at,
    });
    // A periodic pass does not look for these; the one at start does (a running pass is joined, hence the retry).
    const dep = await waitFor(async () => {
      await sweeper.sweep({ repairAll: true });
      const d = (await tc.api.get('/deployments/uncompleted')).body;
      return d.finished_at ? d : null;
    }, 'the deployment to be completed');
    expect(dep).toMatchObject({ status: 'success', finished: 1, succeeded: 1, failed: 0 });
  });

  test('a sweep costs one indexed query when nothing is due, and times out a 2,000-device deployment in one pass (figures)', async () => {
    const { repos, sweeper } = tc.controller.services;
    // Only this test's passes (the last test here, so the timer stays off): a periodic one could run
    // between the inserts below, or be joined with an older view, and time out nothing.
    await sweeper.stop();
    const at = new Date().toISOString();
    const deployment = (id: string, deadline: string | undefined, total: number) => ({
      _id: id, kind: 'deploy' as const, bundle_id: 'b', bundle_version: '0.0.1', target_device_ids: [], status: 'pending' as const,
      total, finished: 0, succeeded: 0, failed: 0, timed_out: 0, timeout_seconds: 60, created_at: at, updated_at: at, finished_at: null,
      ...(deadline ? { deadline_at: deadline } : {}),
    });
    // 2,000 running deployments, half with a timeout an hour away: nothing is due.
    const far = new Date(Date.now() + 3_600_000).toISOString();
    await repos.deployments.insertMany(Array.from({ length: 2000 }, (_, i) => deployment(`bench-${i}`, i % 2 ? far : undefined, 1)));
    const runs = 50;
    let t0 = performance.now();
    for (let i = 0; i < runs; i++) expect(await sweeper.sweep()).toEqual({ timedOut: 0, repaired: 0 });
    const idle = (performance.now() - t0) / runs;

    // One deployment of 2,000 devices that never answered, due now.
    const past = new Date(Date.now() - 1000).toISOString();
    await repos.deployments.insertOne(deployment('bench-due', past, 2000));
    await repos.deviceDeployments.insertMany(Array.from({ length: 2000 }, (_, i) => ({
      _id: `bench-due:d${i}`, deployment_id: 'bench-due', device_id: `d${i}`, kind: 'deploy' as const, bundle_id: 'b',
      bundle_version: '0.0.1', status: 'pending' as const, phase: null, exit_code: null, output_tail: null, error_message: null,
      reason: null, created_at: at, started_at: null, finished_at: null, duration_seconds: null, updated_at: at,
    })));
    t0 = performance.now();
    expect(await sweeper.sweep()).toEqual({ timedOut: 2000, repaired: 0 });
    const expire = performance.now() - t0;
    process.stderr.write(`deployment sweep: ${idle.toFixed(2)} ms per pass with 2,000 running deployments and nothing due; ` +
      `${expire.toFixed(0)} ms to time out a 2,000-device deployment (states, history, completion)\n`);
    const dep = (await tc.api.get('/deployments/bench-due')).body;
    expect(dep).toMatchObject({ status: 'failed', finished: 2000, failed: 2000, timed_out: 2000 });
    expect(await repos.bundleHistory.count({ deployment_id: 'bench-due' })).toBe(2000);
    expect(await repos.deviceDeployments.count({ finalizing: true })).toBe(0);
    expect(await sweeper.sweep()).toEqual({ timedOut: 0, repaired: 0 });
    expect(await repos.bundleHistory.count({ deployment_id: 'bench-due' })).toBe(2000);
  });
});
