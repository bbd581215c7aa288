// The agent killed (SIGKILL) at every phase of a deploy, a script that hangs,
// and the agent stopped (SIGTERM) during a deploy. Real agent processes, real
// bundles, a real controller; the agent's test hook (KERNEX_AGENT_TEST_PAUSE_AT)
// makes it stop at an exact place, so no kill depends on timing.
import { existsSync } from 'node:fs';
import { mkdtemp, readdir, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { startTestController, waitFor, type TestController } from './support/controller.js';
import { startAgentProcess, type AgentProcess } from './support/agent.js';
import { packBundle } from './support/bundles.js';
import { agentState, groupMembers, processRunning, readLines, traceBundle } from './support/faults.js';
import { PAUSE_ENV, type PausePoint } from '../agent/index.js';

let tc: TestController;
let work: string;
const agents: AgentProcess[] = [];

beforeAll(async () => {
  tc = await startTestController({ sweepIntervalMs: 200 });
  work = await mkdtemp(join(tmpdir(), 'kernex-faults-agent-'));
});

afterAll(async () => {
  await Promise.all(agents.map((a) => a.stop('SIGKILL')));
  await tc.stop();
});

async function agent(deviceId: string, env: Record<string, string>, opts: { dataDir?: string; extraArgs?: string[] } = {}) {
  const a = await startAgentProcess({
    deviceId, server: tc.controller.httpUrl, enrollmentToken: tc.creds.enrollment_token, env, ...opts,
  });
  agents.push(a);
  await waitFor(() => tc.controller.broker.isDeviceConnected(deviceId), `${deviceId} connected`, 20_000)
    .catch((err: Error) => {
      throw new Error(`${err.message}\nagent output:\n${a.output()}`);
    });
  return a;
}

async function upload(spec: ReturnType<typeof traceBundle>) {
  const res = await tc.api.upload(await packBundle(spec));
  expect(res.status).toBe(201);
  return res.body as { id: string; version: string; size: number; sha256: string };
}

async function deploy(version: string, deviceId: string): Promise<string> {
  const res = await tc.api.post('/deployments', { bundle_version: version, target_device_ids: [deviceId] });
  expect(res.status).toBe(201);
  return res.body.deployment_id as string;
}

async function finished(id: string) {
  return waitFor(async () => {
    const d = (await tc.api.get(`/deployments/${id}`)).body;
    return d.finished_at ? d : null;
  }, `deployment ${id} to finish`, 30_000);
}

async function history(deviceId: string) {
  return tc.controller.services.repos.bundleHistory.find({ device_id: deviceId });
}

const bundleDir = (a: AgentProcess, version: string) => join(a.dataDir, 'bundles', version);

async function entries(dir: string): Promise<string[]> {
  return (await readdir(dir).catch(() => [] as string[])).sort();
}

/** Waits for the agent to reach `point`, then kills it there. */
async function killAt(a: AgentProcess, point: PausePoint) {
  await waitFor(() => existsSync(join(a.dataDir, `paused-at-${point}`)), `the agent to pause at ${point}`, 20_000)
    .catch((err: Error) => {
      throw new Error(`${err.message}\nagent output:\n${a.output()}`);
    });
  a.child.kill('SIGKILL');
  expect(await a.exited).toEqual({ code: null, signal: 'SIGKILL' });
}

// What must be on the device's disk at the moment of each kill, and what the
// agent recorded durably about the command in flight.
const atKill: Record<Exclude<PausePoint, 'running'>, (a: AgentProcess, version: string, size: number) => Promise<void>> = {
  async received(a, version) {
    expect((await agentState(a.dataDir)).in_flight?.phase).toBe('received');
    expect(await entries(bundleDir(a, version))).toEqual([]);
  },
  async downloading(a, version, size) {
    expect((await agentState(a.dataDir)).in_flight?.phase).toBe('downloading');
    expect(await entries(bundleDir(a, version))).toEqual(['bundle.tar.gz.part']);
    const part = (await stat(join(bundleDir(a, version), 'bundle.tar.gz.part'))).size;
    expect(part).toBeGreaterThan(0);
    expect(part).toBeLessThan(size);
  },
  async verified(a, version, size) {
    expect((await agentState(a.dataDir)).in_flight?.phase).toBe('downloading');
    expect(await entries(bundleDir(a, version))).toEqual(['bundle.tar.gz']);
    expect((await stat(join(bundleDir(a, version), 'bundle.tar.gz'))).size).toBe(size);
  },
  async extracting(a, version) {
    expect((await agentState(a.dataDir)).in_flight?.phase).toBe('extracting');
    // Complete in staging, not yet in place: `root` appears only by a rename.
    const names = await entries(bundleDir(a, version));
    expect(names).toEqual(['bundle.tar.gz', expect.stringMatching(/^root\.staging-/)]);
  },
  async reporting(a, version) {
    const s = await agentState(a.dataDir);
    expect(s.in_flight).toBeNull();
    expect(Object.values(s.handled)).toEqual([expect.objectContaining({ reported: false, result: expect.objectContaining({ status: 'success' }) })]);
    expect(await entries(join(bundleDir(a, version), 'root'))).toEqual(['deploy.sh', 'manifest.json', 'payload']);
  },
};

describe('agent killed (SIGKILL) in each phase before the script ran, or after: resumed, one outcome', () => {
  const points = ['received', 'downloading', 'verified', 'extracting', 'reporting'] as const;
  // Independent devices and bundles: the phases run side by side.
  test.concurrent.each(points.map((p, i) => [p, i] as const))('killed at %s', async (point, i) => {
    const deviceId = `kill-${point}`;
    const out = join(work, `${deviceId}.out`);
    const version = `1.${i}.0`;
    const first = await agent(deviceId, { [PAUSE_ENV]: point, KERNEX_TEST_OUT: out });
    const bundle = await upload(traceBundle(version));
    const id = await deploy(version, deviceId);

    await killAt(first, point);
    await atKill[point](first, version, bundle.size);
    // The script ran before the kill only when the outcome was already recorded.
    expect(await readLines(out)).toEqual(point === 'reporting' ? [`start ${version}`, `deploy ${version}`] : []);
    expect((await tc.api.get(`/deployments/${id}`)).body.finished_at).toBeNull();

    // Restarted without the hook, on the same data dir.
    const second = await agent(deviceId, { KERNEX_TEST_OUT: out }, { dataDir: first.dataDir });
    const dep = await finished(id);
    expect(dep).toMatchObject({ status: 'success', total: 1, finished: 1, succeeded: 1, failed: 0 });
    expect(dep.devices).toEqual([expect.objectContaining({ device_id: deviceId, status: 'success', exit_code: 0, reason: null })]);
    expect(await history(deviceId)).toEqual([
      expect.objectContaining({ deployment_id: id, bundle_version: version, status: 'success' }),
    ]);
    expect((await tc.api.get(`/devices/${deviceId}`)).body.current_bundle_version).toBe(version);

    // On the device: the script ran exactly once, the bundle is whole, nothing half-done is left.
    expect(await readLines(out)).toEqual([`start ${version}`, `deploy ${version}`]);
    expect(await entries(bundleDir(second, version))).toEqual(['bundle.tar.gz', 'root']);
    expect(await entries(join(bundleDir(second, version), 'root', 'payload'))).toEqual(['blob.txt']);
    await waitFor(async () => (await agentState(second.dataDir)).handled[id]?.reported, 'the outcome to be marked reported');
    const s = await agentState(second.dataDir);
    expect(s.in_flight).toBeNull();
    expect(s.current_bundle_version).toBe(version);
    expect(Object.keys(s.handled)).toEqual([id]);
    if (point !== 'reporting') expect(second.output()).toContain('resuming the interrupted command');
    await second.stop();
  });
});

describe('agent killed (SIGKILL) while the script runs', () => {
  /**
   * `running`: killed once the script's process group is recorded; `spawned`:
   * killed after the script started and before its group was recorded.
   */
  async function killWhileRunning(deviceId: string, version: string, idempotent: boolean, point: 'running' | 'spawned' = 'running') {
    const out = join(work, `${deviceId}.out`);
    // The script sleeps in a child process: both outlive the killed agent (own session).
    const first = await agent(deviceId, { [PAUSE_ENV]: point, KERNEX_TEST_OUT: out, KERNEX_TEST_SLEEP: '60' });
    await upload(traceBundle(version, { idempotent }));
    const id = await deploy(version, deviceId);
    await killAt(first, point);

    const inFlight = (await agentState(first.dataDir)).in_flight;
    expect(inFlight).toMatchObject({ phase: 'running', idempotent, run_id: expect.any(String) });
    if (point === 'running') expect(inFlight!.script).toEqual({ pgid: expect.any(Number), start_time: expect.any(Number) });
    else expect(inFlight!.script).toBeUndefined();
    await waitFor(async () => (await readLines(`${out}.pids`)).length === 2, 'the script to record its pids');
    const pids = (await readLines(`${out}.pids`)).map(Number);
    // The script leads its process group.
    const pgid = pids[0]!;
    if (point === 'running') expect(pgid).toBe(inFlight!.script!.pgid);
    for (const pid of pids) expect(await processRunning(pid)).toBe(true);

    const second = await agent(deviceId, { KERNEX_TEST_OUT: out, KERNEX_TEST_SLEEP: '0' }, { dataDir: first.dataDir });
    const dep = await finished(id);
    // What the killed agent left running was ended first.
    for (const pid of pids) expect(await processRunning(pid)).toBe(false);
    expect(await groupMembers(pgid)).toEqual([]);
    expect(second.output()).toContain('ended the script the previous agent process left running');
    return { id, dep, out, second };
  }

  test.concurrent('a script not declared idempotent is reported failed with reason interrupted, never run again', async () => {
    const { id, dep, out, second } = await killWhileRunning('kill-running', '2.0.0', false);
    expect(dep).toMatchObject({ status: 'failed', finished: 1, succeeded: 0, failed: 1 });
    expect(dep.devices).toEqual([expect.objectContaining({ status: 'failed', reason: 'interrupted' })]);
    expect(dep.devices[0].error_message).toMatch(/not declared idempotent/);
    expect(await history('kill-running')).toEqual([expect.objectContaining({ deployment_id: id, status: 'failed' })]);
    // Started once, killed, never finished, never started again.
    expect(await readLines(out)).toEqual(['start 2.0.0']);
    expect((await tc.api.get('/devices/kill-running')).body.current_bundle_version).toBeNull();
    const s = await agentState(second.dataDir);
    expect(s.in_flight).toBeNull();
    expect(s.handled[id]).toMatchObject({ result: { status: 'failed', reason: 'interrupted' } });
    await second.stop();
  });

  test.concurrent('killed after the script started, before its process group was recorded: found by its run id, ended, reported failed', async () => {
    const { id, dep, out, second } = await killWhileRunning('kill-spawned', '2.2.0', false, 'spawned');
    expect(dep).toMatchObject({ status: 'failed', finished: 1, failed: 1 });
    expect(dep.devices).toEqual([expect.objectContaining({ status: 'failed', reason: 'interrupted' })]);
    expect(await history('kill-spawned')).toEqual([expect.objectContaining({ deployment_id: id, status: 'failed' })]);
    expect(await readLines(out)).toEqual(['start 2.2.0']);
    await second.stop();
  });

  test.concurrent('a script declared idempotent runs again after the leftover is ended, and succeeds once', async () => {
    const { id, dep, out, second } = await killWhileRunning('kill-running-idem', '2.1.0', true);
    expect(dep).toMatchObject({ status: 'success', finished: 1, succeeded: 1 });
    expect(await history('kill-running-idem')).toEqual([expect.objectContaining({ deployment_id: id, status: 'success' })]);
    // The first run was cut short; the second one finished.
    expect(await readLines(out)).toEqual(['start 2.1.0', 'start 2.1.0', 'deploy 2.1.0']);
    expect((await tc.api.get('/devices/kill-running-idem')).body.current_bundle_version).toBe('2.1.0');
    await second.stop();
  });
});

test('a hanging script is killed with its whole process group at deploy_timeout, reported failed (timeout)', async () => {
  const deviceId = 'hang';
  const out = join(work, 'hang.out');
  const a = await agent(deviceId, { KERNEX_TEST_OUT: out }, { extraArgs: ['--deploy-timeout', '1'] });
  // Ignores SIGTERM (inherited by its children), so only the SIGKILL after the grace period ends it.
  await upload({
    manifest: { name: 'hang', version: '3.0.0', deploy: { script: 'deploy.sh' } },
    files: {
      'deploy.sh': [
        '#!/bin/sh', "trap '' TERM", 'echo $$ >> "$KERNEX_TEST_OUT.pids"',
        'sleep 1000 &', 'echo $! >> "$KERNEX_TEST_OUT.pids"', 'sleep 1000 &', 'echo $! >> "$KERNEX_TEST_OUT.pids"',
        'echo "hanging"', 'wait', 'echo "never" >> "$KERNEX_TEST_OUT"', '',
      ].join('\n'),
    },
  });
  const id = await deploy('3.0.0', deviceId);
  const dep = await finished(id);
  expect(dep).toMatchObject({ status: 'failed', failed: 1 });
  expect(dep.devices).toEqual([expect.objectContaining({ status: 'failed', reason: 'timeout', exit_code: null })]);
  expect(dep.devices[0].error_message).toBe('deploy.sh timed out after 1 s');
  expect(dep.devices[0].output_tail).toContain('hanging');
  expect(await history(deviceId)).toEqual([expect.objectContaining({ deployment_id: id, status: 'failed' })]);

  const pids = (await readLines(`${out}.pids`)).map(Number);
  expect(pids).toHaveLength(3);
  for (const pid of pids) expect(await processRunning(pid)).toBe(false);
  expect(await groupMembers(pids[0]!)).toEqual([]);
  expect(await readLines(out)).toEqual([]);
  await a.stop();
});

describe('agent stopped (SIGTERM) during a deploy', () => {
  test('mid-download: parks the download, exits 0; the next start resumes it and succeeds once', async () => {
    const deviceId = 'term-download';
    const out = join(work, `${deviceId}.out`);
    const first = await agent(deviceId, { [PAUSE_ENV]: 'downloading', KERNEX_TEST_OUT: out });
    const bundle = await upload(traceBundle('4.0.0'));
    const id = await deploy('4.0.0', deviceId);
    await waitFor(() => existsSync(join(first.dataDir, 'paused-at-downloading')), 'the download to start');
    const partBefore = (await stat(join(bundleDir(first, '4.0.0'), 'bundle.tar.gz.part'))).size;

    const t0 = Date.now();
    first.child.kill('SIGTERM');
    expect(await first.exited).toEqual({ code: 0, signal: null });
    process.stderr.write(`agent SIGTERM while downloading: exited 0 after ${Date.now() - t0} ms\n`);
    expect(first.output()).toContain('agent stopped');
    // Parked: still in flight, the partial download kept for the resume.
    expect((await agentState(first.dataDir)).in_flight?.phase).toBe('downloading');
    expect((await stat(join(bundleDir(first, '4.0.0'), 'bundle.tar.gz.part'))).size).toBe(partBefore);
    expect((await tc.api.get(`/deployments/${id}`)).body.devices[0].status).toBe('in_progress');

    const second = await agent(deviceId, { KERNEX_TEST_OUT: out }, { dataDir: first.dataDir });
    const dep = await finished(id);
    expect(dep.devices).toEqual([expect.objectContaining({ status: 'success' })]);
    expect(await history(deviceId)).toHaveLength(1);
    expect(await readLines(out)).toEqual(['start 4.0.0', 'deploy 4.0.0']);
    expect((await stat(join(bundleDir(second, '4.0.0'), 'bundle.tar.gz'))).size).toBe(bundle.size);
    await second.stop();
  });

  test('while the script runs: lets it finish within the grace period, reports, exits 0', async () => {
    const deviceId = 'term-running';
    const out = join(work, `${deviceId}.out`);
    const a = await agent(deviceId, { KERNEX_TEST_OUT: out, KERNEX_TEST_SLEEP: '1' }, { extraArgs: ['--shutdown-grace', '20'] });
    await upload(traceBundle('4.1.0', { payloadBytes: 1024 }));
    const id = await deploy('4.1.0', deviceId);
    await waitFor(async () => (await readLines(out)).includes('start 4.1.0'), 'the script to start');

    const t0 = Date.now();
    a.child.kill('SIGTERM');
    expect(await a.exited).toEqual({ code: 0, signal: null });
    process.stderr.write(`agent SIGTERM while a 1 s script ran: exited 0 after ${Date.now() - t0} ms\n`);
    // The outcome reached the controller before the agent went.
    const dep = (await tc.api.get(`/deployments/${id}`)).body;
    expect(dep).toMatchObject({ status: 'success', finished: 1 });
    expect(await history(deviceId)).toHaveLength(1);
    expect(await readLines(out)).toEqual(['start 4.1.0', 'deploy 4.1.0']);
    const s = await agentState(a.dataDir);
    expect(s.in_flight).toBeNull();
    expect(s.handled[id]).toMatchObject({ reported: true });
  });

  test('a script that outlasts the grace period is ended and reported failed (interrupted), exit 0', async () => {
    const deviceId = 'term-grace';
    const out = join(work, `${deviceId}.out`);
    const a = await agent(deviceId, { KERNEX_TEST_OUT: out, KERNEX_TEST_SLEEP: '60' }, { extraArgs: ['--shutdown-grace', '1'] });
    await upload(traceBundle('4.2.0', { payloadBytes: 1024 }));
    const id = await deploy('4.2.0', deviceId);
    await waitFor(async () => (await readLines(`${out}.pids`)).length === 2, 'the script to start');
    const pids = (await readLines(`${out}.pids`)).map(Number);

    const t0 = Date.now();
    a.child.kill('SIGTERM');
    expect(await a.exited).toEqual({ code: 0, signal: null });
    process.stderr.write(`agent SIGTERM with a 60 s script, grace 1 s: exited 0 after ${Date.now() - t0} ms\n`);
    for (const pid of pids) expect(await processRunning(pid)).toBe(false);
    const dep = (await tc.api.get(`/deployments/${id}`)).body;
    expect(dep.devices).toEqual([expect.objectContaining({ status: 'failed', reason: 'interrupted' })]);
    expect(await history(deviceId)).toEqual([expect.objectContaining({ status: 'failed' })]);
    expect(await readLines(out)).toEqual(['start 4.2.0']);
  });
});
