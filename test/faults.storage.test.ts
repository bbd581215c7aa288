// A bad link and broken storage. Downloads cut off midway (a proxy in front of
// the controller) resume with Range and are verified whole; a store or blob
// store that cannot be written answers 503, keeps nothing half-written, and
// works again once repaired; an MQTT result that could not be recorded is not
// acknowledged and arrives again. The data directory is broken the way root
// cannot ignore: a datafile path replaced by a directory, a directory by a file.
import { createHash } from 'node:crypto';
import { createRequire } from 'node:module';
import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, readdir, readFile, rename, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { startTestController, waitFor, type TestController } from './support/controller.js';
import { startAgentProcess, type AgentProcess } from './support/agent.js';
import { packBundle, scriptBundle } from './support/bundles.js';
import { startCuttingProxy, type CuttingProxy } from './support/cutting-proxy.js';
import { agentState, gatedBundle, readLines, traceBundle } from './support/faults.js';

let tc: TestController;
let work: string;
const agents: AgentProcess[] = [];
const proxies: CuttingProxy[] = [];
const gates: string[] = [];

beforeAll(async () => {
  tc = await startTestController({ sweepIntervalMs: 200 });
  work = await mkdtemp(join(tmpdir(), 'kernex-faults-storage-'));
});

afterAll(async () => {
  await Promise.all(gates.map((g) => writeFile(g, 'open')));
  await Promise.all(agents.map((a) => a.stop('SIGKILL')));
  await Promise.all(proxies.map((p) => p.close()));
  await tc.stop();
});

async function agent(deviceId: string, server: string, env: Record<string, string> = {}) {
  const a = await startAgentProcess({ deviceId, server, enrollmentToken: tc.creds.enrollment_token, env });
  agents.push(a);
  await waitFor(() => tc.controller.broker.isDeviceConnected(deviceId), `${deviceId} connected`, 20_000);
  return a;
}

async function finished(id: string) {
  return waitFor(async () => {
    const d = (await tc.api.get(`/deployments/${id}`)).body;
    return d?.finished_at ? d : null;
  }, `deployment ${id} to finish`, 60_000);
}

const history = (deviceId: string) => tc.controller.services.repos.bundleHistory.find({ device_id: deviceId });

describe('download cut off midway', () => {
  test('the agent resumes with Range after each cut, backs off, verifies the whole sha256, and deploys once', async () => {
    const cutAfter = 40_000;
    const proxy = await startCuttingProxy({ targetPort: tc.controller.httpPort, cuts: 3, cutAfterBytes: cutAfter });
    proxies.push(proxy);
    const out = join(work, 'cut.out');
    const a = await agent('cut', proxy.url, { KERNEX_TEST_OUT: out });
    const archive = await packBundle(traceBundle('1.0.0', { payloadBytes: 200 * 1024 }));
    const bundle = (await tc.api.upload(archive)).body as { size: number; sha256: string };
    expect(bundle.size).toBeGreaterThan(4 * cutAfter);

    const t0 = Date.now();
    const id = (await tc.api.post('/deployments', { bundle_version: '1.0.0', target_device_ids: ['cut'] })).body.deployment_id;
    const dep = await finished(id);
    process.stderr.write(`download cut 3 times at ${cutAfter} bytes of response: deployed after ${Date.now() - t0} ms\n`);
    expect(dep.devices).toEqual([expect.objectContaining({ status: 'success' })]);

    // Four requests: from the start, then each from where the last one stopped.
    expect(proxy.cutsDone).toBe(3);
    expect(proxy.downloads).toHaveLength(4);
    expect(proxy.downloads[0]).not.toMatch(/range:/i);
    const offsets = proxy.downloads.slice(1).map((head) => Number(/range: bytes=(\d+)-/i.exec(head)?.[1]));
    expect(offsets).toEqual([...offsets].sort((x, y) => x - y));
    expect(offsets[0]).toBeGreaterThan(0);
    expect(offsets[2]).toBeLessThan(bundle.size);
    // The bytes on the device are the bundle, whole.
    const onDevice = await readFile(join(a.dataDir, 'bundles', '1.0.0', 'bundle.tar.gz'));
    expect(createHash('sha256').update(onDevice).digest('hex')).toBe(bundle.sha256);
    expect(onDevice.equals(archive)).toBe(true);
    expect(await readLines(out)).toEqual(['start 1.0.0', 'deploy 1.0.0']);
    expect(await history('cut')).toHaveLength(1);
  });

  test('a resumed download with a damaged byte fails verification: nothing runs, nothing is kept', async () => {
    const proxy = await startCuttingProxy({ targetPort: tc.controller.httpPort, cuts: 1, cutAfterBytes: 30_000, corruptAt: 5_000 });
    proxies.push(proxy);
    const out = join(work, 'corrupt.out');
    const a = await agent('corrupt', proxy.url, { KERNEX_TEST_OUT: out });
    await tc.api.upload(await packBundle(traceBundle('2.0.0', { payloadBytes: 100 * 1024 })));
    const id = (await tc.api.post('/deployments', { bundle_version: '2.0.0', target_device_ids: ['corrupt'] })).body.deployment_id;
    const dep = await finished(id);
    expect(proxy.downloads).toHaveLength(2);
    expect(proxy.downloads[1]).toMatch(/range: bytes=\d+-/i);
    expect(dep.devices).toEqual([expect.objectContaining({ status: 'failed', reason: 'bundle_verification_failed' })]);
    expect(dep.devices[0].error_message).toMatch(/sha256 mismatch/);
    expect(await readLines(out)).toEqual([]);
    expect(existsSync(join(a.dataDir, 'bundles', '2.0.0'))).toBe(false);
    expect(await history('corrupt')).toEqual([expect.objectContaining({ status: 'failed' })]);
  });
});

describe('store or blob store unavailable', () => {
  const db = () => join(tc.dataDir, 'db');
  const blobs = () => join(tc.dataDir, 'blobs');

  /** Replaces a datafile with a directory (writes fail even for root); returns the repair. */
  async function breakDatafile(name: string): Promise<() => Promise<void>> {
    const file = join(db(), `${name}.db`);
    await rename(file, `${file}.aside`);
    await mkdir(file);
    return async () => {
      await rm(file, { recursive: true });
      await rename(`${file}.aside`, file);
    };
  }

  test('blob store unwritable: upload answers 503, nothing stored; works once repaired', async () => {
    const tmp = join(blobs(), '.tmp');
    await rm(tmp, { recursive: true });
    await writeFile(tmp, 'not a directory');
    const before = (await readdir(blobs())).sort();
    const archive = await packBundle(scriptBundle('3.0.0', '/dev/null'));
    const res = await tc.api.upload(archive);
    expect(res.status).toBe(503);
    expect(res.headers.get('retry-after')).toBe('5');
    expect(res.body).toEqual({ error: 'blob_store_unavailable', message: 'the bundle store is unavailable; retry shortly' });
    expect((await readdir(blobs())).sort()).toEqual(before);
    expect((await tc.api.get('/bundles')).body.map((b: { version: string }) => b.version)).not.toContain('3.0.0');

    await rm(tmp);
    await mkdir(tmp);
    expect((await tc.api.upload(archive)).status).toBe(201);
  });

  test('store unwritable: upload answers 503 and leaves no blob; reads say so too; works once repaired', async () => {
    const versionsBefore = (await tc.api.get('/bundles')).body.map((b: { version: string }) => b.version);
    const repair = await breakDatafile('bundles');
    const blobsBefore = (await readdir(blobs())).sort();
    const archive = await packBundle(scriptBundle('4.0.0', '/dev/null'));
    const res = await tc.api.upload(archive);
    expect(res.status).toBe(503);
    expect(res.body).toEqual({ error: 'store_unavailable', message: 'the data store is unavailable; retry shortly' });
    // The blob written before the store refused was removed again.
    expect((await readdir(blobs())).sort()).toEqual(blobsBefore);
    expect((await tc.api.get('/bundles')).status).toBe(503);

    await repair();
    expect((await tc.api.get('/bundles')).body.map((b: { version: string }) => b.version)).toEqual(versionsBefore);
    expect((await tc.api.upload(archive)).status).toBe(201);
  });

  test('a deployment that cannot be stored answers 503 and leaves no trace', async () => {
    await tc.api.upload(await packBundle(scriptBundle('5.0.0', '/dev/null')));
    await agent('nostore', tc.controller.httpUrl);
    const statesBefore = await readLines(join(db(), 'deployment_devices.db'));
    const repair = await breakDatafile('deployments');
    const res = await tc.api.post('/deployments', { bundle_version: '5.0.0', target_device_ids: ['nostore'] });
    expect(res.status).toBe(503);
    expect(res.body.error).toBe('store_unavailable');
    await repair();
    const listed = (await tc.api.get('/deployments')).body as Array<{ target_device_ids: string[] }>;
    expect(listed.filter((d) => d.target_device_ids.includes('nostore'))).toEqual([]);
    // The states written before the deployment failed were removed: no live state, nothing sent on reconnect.
    expect(await tc.controller.services.deployments.pendingCommands('nostore')).toEqual([]);
    expect(await tc.controller.services.repos.deviceDeployments.count({ device_id: 'nostore' })).toBe(0);
    // They were written, then deleted (NeDB appends both).
    expect((await readLines(join(db(), 'deployment_devices.db'))).length).toBe(statesBefore.length + 2);
  });

  test('an MQTT result that cannot be recorded is not acknowledged, arrives again, and is recorded once repaired', async () => {
    const out = join(work, 'mqtt-store.out');
    const gate = join(work, 'mqtt-store.gate');
    gates.push(gate);
    const a = await agent('mqtt-store', tc.controller.httpUrl, { KERNEX_TEST_OUT: out, KERNEX_TEST_GATE: gate });
    await tc.api.upload(await packBundle(gatedBundle('6.0.0')));
    const id = (await tc.api.post('/deployments', { bundle_version: '6.0.0', target_device_ids: ['mqtt-store'] })).body.deployment_id;
    await waitFor(async () => (await tc.api.get(`/deployments/${id}`)).body.devices[0].phase === 'running', 'the script to run');

    const repair = await breakDatafile('deployment_devices');
    const failedBefore = tc.controller.counters.failed;
    await writeFile(gate, 'open');
    // The outcome is sent, refused (no PUBACK, connection closed), and sent again.
    await waitFor(() => tc.controller.counters.failed >= failedBefore + 2, 'the result to be refused twice', 30_000);
    const s = await agentState(a.dataDir);
    expect(s.handled[id]).toMatchObject({ reported: false, result: { status: 'success' } });
    expect((await tc.api.get(`/deployments/${id}`)).status).toBe(503);
    expect(await history('mqtt-store')).toEqual([]);

    await repair();
    const dep = await finished(id);
    expect(dep).toMatchObject({ status: 'success', finished: 1, succeeded: 1 });
    expect(await history('mqtt-store')).toEqual([expect.objectContaining({ deployment_id: id, status: 'success' })]);
    await waitFor(async () => (await agentState(a.dataDir)).handled[id]?.reported, 'the agent to get its acknowledgement');
    expect(await readLines(out)).toEqual(['start 6.0.0', 'deploy 6.0.0']);
  });

  test('a store failure between a final state and its history: the re-sent result completes it, nothing twice', async () => {
    const out = join(work, 'halfway.out');
    const gate = join(work, 'halfway.gate');
    gates.push(gate);
    const a = await agent('halfway', tc.controller.httpUrl, { KERNEX_TEST_OUT: out, KERNEX_TEST_GATE: gate });
    await tc.api.upload(await packBundle(gatedBundle('7.0.0')));
    const id = (await tc.api.post('/deployments', { bundle_version: '7.0.0', target_device_ids: ['halfway'] })).body.deployment_id;
    await waitFor(async () => (await tc.api.get(`/deployments/${id}`)).body.devices[0].phase === 'running', 'the script to run');

    // The state can be written, its history cannot.
    const repair = await breakDatafile('device_bundle_history');
    const failedBefore = tc.controller.counters.failed;
    await writeFile(gate, 'open');
    await waitFor(() => tc.controller.counters.failed > failedBefore, 'the result to be refused');
    const state = await tc.controller.services.repos.deviceDeployments.findOne({ _id: `${id}:halfway` });
    expect(state).toMatchObject({ status: 'success', finalizing: true });
    expect((await tc.api.get(`/deployments/${id}`)).body).toMatchObject({ finished_at: null, finished: 0 });

    await repair();
    const dep = await finished(id);
    expect(dep).toMatchObject({ status: 'success', finished: 1, succeeded: 1, failed: 0 });
    expect(await history('halfway')).toEqual([expect.objectContaining({ deployment_id: id, status: 'success' })]);
    expect(await tc.controller.services.repos.deviceDeployments.findOne({ _id: `${id}:halfway` }))
      .not.toHaveProperty('finalizing');
    expect((await tc.api.get('/devices/halfway')).body.current_bundle_version).toBe('7.0.0');
    await waitFor(async () => (await agentState(a.dataDir)).handled[id]?.reported, 'the agent to get its acknowledgement');
    expect(await readLines(out)).toEqual(['start 7.0.0', 'deploy 7.0.0']);
  });

  test('S3 unreachable: upload answers 503 and nothing is recorded; works once S3 is back', async () => {
    // s3rver ships no types: this is the part of its API used here.
    type S3rverServer = { run(): Promise<{ port: number }>; close(): Promise<void> };
    const S3rver = createRequire(import.meta.url)('s3rver') as new (o: Record<string, unknown>) => S3rverServer;
    const directory = await mkdtemp(join(tmpdir(), 'kernex-faults-s3-'));
    const start = (port: number) => {
      const server = new S3rver({ port, address: '127.0.0.1', silent: true, directory, resetOnClose: false });
      return server.run().then(({ port: bound }) => ({ server, port: bound }));
    };
    let s3 = await start(0);
    const s3tc = await startTestController({
      sweepIntervalMs: 200,
      s3: { endPoint: '127.0.0.1', port: s3.port, useSSL: false, accessKey: 'S3RVER', secretKey: 'S3RVER', bucket: 'kernex-faults', region: 'us-east-1' },
    });
    try {
      const archive = await packBundle(scriptBundle('8.0.0', '/dev/null'));
      await s3.server.close();
      const res = await s3tc.api.upload(archive);
      expect(res.status).toBe(503);
      expect(res.body).toEqual({ error: 'blob_store_unavailable', message: 'the bundle store is unavailable; retry shortly' });
      expect((await s3tc.api.get('/bundles')).body).toEqual([]);

      s3 = await start(s3.port);
      expect((await s3tc.api.upload(archive)).status).toBe(201);
      expect((await s3tc.api.get('/bundles')).body.map((b: { version: string }) => b.version)).toEqual(['8.0.0']);
    } finally {
      await s3tc.stop();
      await s3.server.close().catch(() => undefined);
      await rm(directory, { recursive: true, force: true });
    }
  });
});
