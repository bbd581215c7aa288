// The controller process killed (SIGKILL) in the middle of a 20-device
// deployment and started again on the same data dir (with the embedded broker,
// and with the broker's sessions and queues in Redis), and stopped (SIGTERM)
// during one. Devices: real agent processes, and light simulated devices
// (test/support/sim-device.ts) that keep the agent's promises.
import { existsSync } from 'node:fs';
import { mkdtemp, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { waitFor } from './support/controller.js';
import { startControllerProcess, type ControllerProcess } from './support/controller-process.js';
import { startAgentProcess, type AgentProcess } from './support/agent.js';
import { packBundle } from './support/bundles.js';
import { SimDevice } from './support/sim-device.js';
import { agentState, gatedBundle, readLines } from './support/faults.js';
import { hasProgram } from './support/programs.js';
import { startRedis, type RedisServer } from './support/redis.js';

let work: string;
/** Gate files the gated scripts wait for; all opened at the end, so no script outlives the tests. */
const gates: string[] = [];
const agents: AgentProcess[] = [];
const sims: SimDevice[] = [];
const controllers: ControllerProcess[] = [];
const withRedis = hasProgram('redis-server');
let redis: RedisServer | undefined;

beforeAll(async () => {
  work = await mkdtemp(join(tmpdir(), 'kernex-faults-ctl-'));
  if (withRedis) redis = await startRedis();
});

afterAll(async () => {
  await Promise.all(gates.map((g) => writeFile(g, 'open')));
  await Promise.all(agents.map((a) => a.stop('SIGKILL')));
  await Promise.all(sims.map((s) => s.stop()));
  await Promise.all(controllers.map((c) => c.kill('SIGKILL')));
  await redis?.stop();
});

/** A real agent whose gated script waits for `gate` and appends to `<dir of gate>/<deviceId>.out`. */
async function startAgent(ctl: ControllerProcess, deviceId: string, gate: string) {
  gates.push(gate);
  const a = await startAgentProcess({
    deviceId, server: ctl.httpUrl, enrollmentToken: ctl.creds.enrollment_token,
    env: { KERNEX_TEST_OUT: join(dirname(gate), `${deviceId}.out`), KERNEX_TEST_GATE: gate },
  });
  agents.push(a);
  return a;
}

async function deviceStates(ctl: ControllerProcess, id: string): Promise<Map<string, Record<string, unknown>>> {
  const res = await ctl.api.get(`/deployments/${id}`);
  return new Map((res.body.devices as Array<Record<string, unknown>>).map((d) => [d.device_id as string, d]));
}

/** History entries of one deployment, read from the datafile the controller writes (one line per write, last wins). */
async function historyOf(ctl: ControllerProcess, deploymentId: string) {
  const lines = await readLines(join(ctl.dataDir, 'db', 'device_bundle_history.db'));
  const docs = new Map<string, Record<string, unknown>>();
  for (const line of lines) {
    const doc = JSON.parse(line) as Record<string, unknown>;
    if (doc.deployment_id === deploymentId) docs.set(doc._id as string, doc);
  }
  return [...docs.values()];
}

/** One broker backend's run; each has its own controller, data dir and device-side files. */
async function sigkillMidDeployment(env: Record<string, string>) {
  const work = await mkdtemp(join(tmpdir(), 'kernex-faults-kill-'));
  const ctl = await startControllerProcess({ env });
  controllers.push(ctl);
  // 6 real agents: a0-a2 finish before the kill, a3-a5 are running their script at the kill.
  const realIds = ['a0', 'a1', 'a2', 'a3', 'a4', 'a5'];
  for (const id of ['a0', 'a1', 'a2']) await writeFile(join(work, `${id}.gate`), 'open');
  const real = await Promise.all(realIds.map((id) => startAgent(ctl, id, join(work, `${id}.gate`))));
  // 14 simulated: s0-s6 finish at once, s7-s10 are offline until after the restart,
  // s11-s13 hold the command (running) across the kill.
  const simIds = Array.from({ length: 14 }, (_, i) => `s${i}`);
  const sim = new Map<string, SimDevice>();
  for (const id of simIds) {
    const d = await SimDevice.register(ctl.httpUrl, id, ctl.creds.enrollment_token, Number(id.slice(1)) >= 11 ? 'hold' : 'succeed');
    sim.set(id, d);
    sims.push(d);
  }
  const early = simIds.filter((id) => Number(id.slice(1)) <= 6);
  const offline = ['s7', 's8', 's9', 's10'];
  const holding = ['s11', 's12', 's13'];
  for (const id of [...early, ...holding]) sim.get(id)!.connect(ctl.mqttUrl);
  const targets = [...realIds, ...simIds];
  await waitFor(async () => {
    const online = (await ctl.api.get('/devices?status=online')).body as Array<{ device_id: string }>;
    return online.length === 16;
  }, '16 devices online', 30_000);

  const up = await ctl.api.upload(await packBundle(gatedBundle('5.0.0')));
  expect(up.status).toBe(201);
  const created = await ctl.api.post('/deployments', { bundle_version: '5.0.0', target_device_ids: targets });
  expect(created.status).toBe(201);
  const id = created.body.deployment_id as string;

  const doneEarly = ['a0', 'a1', 'a2', ...early];
  const running = ['a3', 'a4', 'a5', ...holding];
  await waitFor(async () => {
    const states = await deviceStates(ctl, id);
    return doneEarly.every((d) => states.get(d)!.status === 'success')
      && running.every((d) => states.get(d)!.status === 'in_progress' && states.get(d)!.phase === 'running')
      && (await ctl.api.get(`/deployments/${id}`)).body.finished === 10;
  }, '10 devices done and 6 running', 30_000);
  const before = (await ctl.api.get(`/deployments/${id}`)).body;
  expect(before).toMatchObject({ finished: 10, succeeded: 10, failed: 0, finished_at: null });

  // Kill -9, then let the running devices finish while nobody listens.
  const t0 = Date.now();
  expect(await ctl.kill('SIGKILL')).toEqual({ code: null, signal: 'SIGKILL' });
  for (const a of ['a3', 'a4', 'a5']) await writeFile(join(work, `${a}.gate`), 'open');
  for (const s of holding) sim.get(s)!.release();
  for (const a of real.slice(3)) {
    await waitFor(async () => (await agentState(a.dataDir)).handled[id], `${a.deviceId} to record its outcome`);
    expect((await agentState(a.dataDir)).handled[id]!.reported).toBe(false);
  }

  await ctl.restart();
  for (const s of offline) sim.get(s)!.connect(ctl.mqttUrl);
  const dep = await waitFor(async () => {
    const d = (await ctl.api.get(`/deployments/${id}`)).body;
    return d.finished_at ? d : null;
  }, 'the deployment to finish after the restart', 60_000);
  process.stderr.write(`controller SIGKILL + restart (${env.KERNEX_REDIS_URL ? 'Redis' : 'embedded'} broker): ` +
    `20-device deployment finished ${Date.now() - t0} ms after the kill\n`);

  // Controller side: every state intact and final once; counters and history exact.
  expect(dep).toMatchObject({ status: 'success', total: 20, finished: 20, succeeded: 20, failed: 0 });
  expect(dep.devices).toHaveLength(20);
  for (const d of dep.devices) expect(d).toMatchObject({ status: 'success', phase: null, error_message: null });
  const history = await historyOf(ctl, id);
  expect(history.map((h) => h.device_id).sort()).toEqual([...targets].sort());
  expect(history.every((h) => h.status === 'success')).toBe(true);
  // The deployment completes once every state is final; each device's version
  // is written by that device's own finalization, which may still be running.
  const onVersion = async () => ((await ctl.api.get('/devices')).body as Array<{ device_id: string; current_bundle_version: string }>)
    .filter((d) => d.current_bundle_version === '5.0.0').map((d) => d.device_id).sort();
  await waitFor(async () => (await onVersion()).length === targets.length, 'every device on 5.0.0');
  expect(await onVersion()).toEqual([...targets].sort());

  // Device side: each ran the deploy exactly once.
  for (const a of real) {
    expect(await readLines(join(work, `${a.deviceId}.out`))).toEqual(['start 5.0.0', 'deploy 5.0.0']);
    await waitFor(async () => (await agentState(a.dataDir)).handled[id]?.reported, `${a.deviceId}'s outcome acknowledged`);
  }
  for (const s of sim.values()) expect(s.executions.get(id)).toBe(1);
  // Devices that had finished before the kill were not told again; the offline ones got it once.
  for (const s of early) expect(sim.get(s)!.received).toEqual([id]);
  // Delivery is at least once (with a session kept in Redis, the broker's queue and the
  // controller's resend on subscribe both deliver it); each still ran it once, as the
  // single history entry per device shows.
  for (const s of offline) expect([...new Set(sim.get(s)!.received)]).toEqual([id]);
  for (const a of real.slice(0, 3)) expect(a.output()).not.toContain('duplicate command answered from record');
}

test('SIGKILL mid-deployment (20 devices), restart on the same data dir: nothing lost, nothing twice', async () => {
  await sigkillMidDeployment({});
}, 120_000);

(withRedis ? test : test.skip)('the same on the Redis broker: sessions and queued commands outlive the killed process', async () => {
  await sigkillMidDeployment({ KERNEX_REDIS_URL: redis!.url });
}, 120_000);

test('SIGTERM during a deploy: exits 0 promptly, heartbeats flushed, the deploy completes after the restart', async () => {
  // Heartbeats are flushed every 10 minutes here: only the shutdown flush can have written them.
  const ctl = await startControllerProcess({ env: { KERNEX_HEARTBEAT_FLUSH_MS: '600000' } });
  controllers.push(ctl);
  const gate = join(work, 'term-gate');
  const a = await startAgent(ctl, 'term-a', gate);
  await waitFor(async () => (await ctl.api.get('/devices/term-a')).body.last_heartbeat, 'a heartbeat');
  expect((await ctl.api.upload(await packBundle(gatedBundle('6.0.0')))).status).toBe(201);
  const created = await ctl.api.post('/deployments', { bundle_version: '6.0.0', target_device_ids: ['term-a'] });
  const id = created.body.deployment_id as string;
  await waitFor(async () => (await deviceStates(ctl, id)).get('term-a')!.phase === 'running', 'the script to run');

  const t0 = Date.now();
  const ended = await ctl.kill('SIGTERM');
  if (ended.code !== 0) process.stderr.write(ctl.output());
  expect(ended).toEqual({ code: 0, signal: null });
  process.stderr.write(`controller SIGTERM with a device connected and a deploy running: exited 0 after ${Date.now() - t0} ms\n`);
  const log = ctl.output();
  expect(log).toContain('controller stopping');
  expect(log).toContain('controller stopped');
  // The flush at stop wrote the heartbeat; nothing else could have.
  const deviceLines = await readLines(join(ctl.dataDir, 'db', 'devices.db'));
  const stored = deviceLines.map((l) => JSON.parse(l) as Record<string, unknown>).filter((d) => d.device_id === 'term-a').at(-1)!;
  expect(stored.last_heartbeat).toEqual(expect.any(String));

  await ctl.restart();
  await writeFile(gate, 'open');
  const dep = await waitFor(async () => {
    const d = (await ctl.api.get(`/deployments/${id}`)).body;
    return d.finished_at ? d : null;
  }, 'the deployment to finish', 60_000);
  expect(dep).toMatchObject({ status: 'success', finished: 1 });
  expect(await historyOf(ctl, id)).toEqual([expect.objectContaining({ device_id: 'term-a', status: 'success' })]);
  expect(await readLines(join(work, 'term-a.out'))).toEqual(['start 6.0.0', 'deploy 6.0.0']);
  expect(existsSync(join(a.dataDir, 'state.json'))).toBe(true);
}, 90_000);

test('SIGKILL between a final state and its history: the sweep at restart completes it, once', async () => {
  const ctl = await startControllerProcess();
  controllers.push(ctl);
  const quick = await SimDevice.register(ctl.httpUrl, 'crash-a', ctl.creds.enrollment_token, 'succeed');
  const slow = await SimDevice.register(ctl.httpUrl, 'crash-b', ctl.creds.enrollment_token, 'hold');
  sims.push(quick, slow);
  quick.connect(ctl.mqttUrl);
  slow.connect(ctl.mqttUrl);
  expect((await ctl.api.upload(await packBundle(gatedBundle('7.0.0')))).status).toBe(201);
  const id = (await ctl.api.post('/deployments', { bundle_version: '7.0.0', target_device_ids: ['crash-a', 'crash-b'] }))
    .body.deployment_id as string;
  // crash-a counted as finished: its state, history and version are all written
  // (its state reads `success` a moment before they are).
  await waitFor(async () => {
    const dep = (await ctl.api.get(`/deployments/${id}`)).body;
    const a = (dep.devices as Array<Record<string, unknown>>).find((d) => d.device_id === 'crash-a')!;
    return a.status === 'success' && dep.finished === 1 && slow.holds(id);
  }, 'crash-a done, crash-b running');
  // crash-a's history follows its final state: let it land before the kill, as the case assumes.
  await waitFor(async () => (await historyOf(ctl, id)).length === 1, 'crash-a\'s history');
  await slow.drop();
  expect(await ctl.kill('SIGKILL')).toEqual({ code: null, signal: 'SIGKILL' });

  // What the datafile holds when the controller dies right after writing crash-b's
  // final state, before its history and the deployment's completion: NeDB appends
  // the whole updated document as a line, and the last line of an _id wins.
  const statesFile = join(ctl.dataDir, 'db', 'deployment_devices.db');
  const lines = (await readLines(statesFile)).map((l) => JSON.parse(l) as Record<string, unknown>);
  const last = lines.filter((d) => d._id === `${id}:crash-b`).at(-1)!;
  const at = new Date().toISOString();
  const { appendFile } = await import('node:fs/promises');
  await appendFile(statesFile, `${JSON.stringify({
    ...last, status: 'success', phase: null, exit_code: 0, finished_at: at, updated_at: at, finalizing: true,
  })}\n`);
  expect((await historyOf(ctl, id)).map((h) => h.device_id)).toEqual(['crash-a']);

  await ctl.restart();
  const dep = (await ctl.api.get(`/deployments/${id}`)).body;
  expect(ctl.output()).toContain('"repaired":1');
  expect(dep).toMatchObject({ status: 'success', total: 2, finished: 2, succeeded: 2, failed: 0 });
  expect(dep.finished_at).toEqual(expect.any(String));
  expect((await historyOf(ctl, id)).map((h) => h.device_id).sort()).toEqual(['crash-a', 'crash-b']);
  expect((await ctl.api.get('/devices/crash-b')).body.current_bundle_version).toBe('7.0.0');

  // crash-b reconnects and sends its outcome: a duplicate, changing nothing.
  slow.connect(ctl.mqttUrl);
  slow.release();
  await waitFor(() => /"deviceId":"crash-b"[^\n]*"msg":"duplicate result ignored"/.test(ctl.output()), 'its outcome to be seen');
  expect(slow.executions.get(id)).toBe(1);
  expect((await ctl.api.get(`/deployments/${id}`)).body).toMatchObject({ finished: 2, succeeded: 2, finished_at: dep.finished_at });
  expect((await historyOf(ctl, id))).toHaveLength(2);
}, 90_000);
