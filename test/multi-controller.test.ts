// Two controllers on one Redis and one store, behind a TCP load balancer,
// with a real agent process: one broker and one control plane.
//
// The controllers run in this test process and share one store handle: the
// embedded store cannot be shared between processes, and no MongoDB server
// can run on these machines. Everything else is as in production: each
// controller has its own Aedes broker, its own Redis connections, its own
// listeners and in-memory state (heartbeat buffers, presence, caches). The
// same scenario with separate processes is in multi-process.e2e.test.ts.
import { mkdtemp, readFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import mqtt, { type MqttClient } from 'mqtt';
import { openStore, type Store } from '../controller/store/index.js';
import { hasProgram } from './support/programs.js';
import { startRedis, type RedisServer } from './support/redis.js';
import { startTestController, waitFor, type ApiClient, type TestController } from './support/controller.js';
import { startAgentProcess, type AgentProcess } from './support/agent.js';
import { startTcpProxy, type TcpProxy } from './support/proxy.js';
import { packBundle, scriptBundle } from './support/bundles.js';

const run = hasProgram('redis-server') ? describe : describe.skip;

run('two controllers, one Redis, one store', () => {
  let redis: RedisServer;
  let store: Store;
  let dataDir: string;
  let work: string;
  let one: TestController;
  let two: TestController;
  let mqttLb: TcpProxy;
  let httpLb: TcpProxy;
  let agent: AgentProcess;
  let watcher: MqttClient;
  const statuses: Array<{ status: string }> = [];
  const stopped = new Set<TestController>();

  /** Instance 1 flushes slowly, so what it learns late is written late: the case presence must survive. */
  const start = (instanceId: string, heartbeatFlushMs: number) =>
    startTestController({ redisUrl: redis.url, instanceId, dataDir, heartbeatFlushMs }, undefined, { store });

  const deviceOn = async (api: ApiClient) => (await api.get('/devices/dev-m')).body as Record<string, unknown>;

  async function deploy(api: ApiClient, version: string) {
    const created = await api.post('/deployments', { bundle_version: version, target_device_ids: ['dev-m'] });
    expect(created.status).toBe(201);
    const id = created.body.deployment_id as string;
    return waitFor(async () => {
      const d = (await api.get(`/deployments/${id}`)).body;
      return d.finished_at ? d : null;
    }, `deployment of ${version} to finish`, 30_000).catch((err: Error) => {
      throw new Error(`${err.message}\nagent output:\n${agent.output()}`);
    });
  }

  beforeAll(async () => {
    redis = await startRedis();
    work = await mkdtemp(join(tmpdir(), 'kernex-multi-'));
    // Shared as the controllers of a real deployment share MongoDB and S3.
    dataDir = join(work, 'controller');
    store = await openStore({ dataDir, inMemory: true });
    one = await start('ctl-1', 2_000);
    two = await start('ctl-2', 100);
    mqttLb = await startTcpProxy([one.controller.mqttPort, two.controller.mqttPort]);
    httpLb = await startTcpProxy([one.controller.httpPort, two.controller.httpPort]);
    watcher = mqtt.connect(`mqtt://127.0.0.1:${two.controller.mqttPort}`, {
      clientId: 'status-watcher', username: 'ops', password: two.creds.token, protocolVersion: 4,
    });
    watcher.on('message', (_t, payload) => statuses.push(JSON.parse(payload.toString()) as { status: string }));
    await new Promise<void>((resolve, reject) =>
      watcher.on('connect', () => watcher.subscribe('kernex/devices/dev-m/status', { qos: 1 }, (err) => (err ? reject(err) : resolve()))));
  });

  afterAll(async () => {
    await agent?.stop();
    watcher?.end(true);
    for (const c of [one, two]) if (c && !stopped.has(c)) await c.stop();
    await mqttLb?.close();
    await httpLb?.close();
    await store?.close();
    await redis?.stop();
  });

  test('a deployment created through instance 2 reaches the device on instance 1, and is processed once, there', async () => {
    expect(one.creds.token).toBe(two.creds.token);
    agent = await startAgentProcess({
      deviceId: 'dev-m', server: `http://127.0.0.1:${httpLb.port}`, enrollmentToken: one.creds.enrollment_token,
      extraArgs: ['--mqtt-url', `mqtt://127.0.0.1:${mqttLb.port}`],
    });
    await waitFor(async () => (await deviceOn(two.api)).status === 'online', 'dev-m online, as instance 2 sees it');
    expect(mqttLb.connections()).toEqual([{ target: one.controller.mqttPort }]);
    expect(await deviceOn(one.api)).toEqual(expect.objectContaining({ status: 'online', mqtt_instance: 'ctl-1' }));

    const out = join(work, 'deploys.out');
    expect((await two.api.upload(await packBundle(scriptBundle('1.0.0', out)))).status).toBe(201);
    const dep = await deploy(two.api, '1.0.0');

    expect(dep).toEqual(expect.objectContaining({ status: 'success', finished: 1, succeeded: 1, failed: 0 }));
    expect(await readFile(out, 'utf8')).toBe('deploy 1.0.0\n');
    const history = await one.controller.services.repos.bundleHistory.find({ device_id: 'dev-m' });
    expect(history).toEqual([expect.objectContaining({ deployment_id: dep.deployment_id, status: 'success' })]);
    // The device's messages went to the instance it is connected to, and only there.
    await waitFor(() => one.controller.services.devices.counters.heartbeats >= 2, 'heartbeats on instance 1');
    expect(one.controller.counters.results).toBeGreaterThanOrEqual(1);
    expect(two.controller.counters.results).toBe(0);
    expect(two.controller.services.devices.counters.heartbeats).toBe(0);
    // Heartbeats reach the store from instance 1's batches, and instance 2 serves them.
    const lastHeartbeat = async () => ((await deviceOn(two.api)).last_heartbeat as string | null) ?? '';
    const seen = await lastHeartbeat();
    await waitFor(async () => (await lastHeartbeat()) > seen, 'a newer heartbeat, through instance 2');
  });

  test('killing instance 1 moves the device to instance 2, and a deployment made meanwhile is not lost', async () => {
    const out = join(work, 'deploys.out');
    expect((await two.api.upload(await packBundle(scriptBundle('1.1.0', out)))).status).toBe(201);
    const heartbeatsBefore = two.controller.services.devices.counters.heartbeats;

    await one.stop();
    stopped.add(one);
    // Created while the device has no connection at all: it waits in Redis
    // (and the agent may fetch it sooner over its HTTP fallback, through the
    // balancer, from instance 2: either way it runs once).
    const dep = await deploy(two.api, '1.1.0');

    expect(dep.status).toBe('success');
    expect(await readFile(out, 'utf8')).toBe('deploy 1.0.0\ndeploy 1.1.0\n');
    // Over HTTP meanwhile, perhaps (the agent's fallback): its MQTT connection
    // comes back through the balancer, to instance 2.
    await waitFor(() => mqttLb.connections().length === 1, 'the MQTT connection back', 30_000);
    expect(mqttLb.connections()).toEqual([{ target: two.controller.mqttPort }]);
    await waitFor(async () => {
      const d = await deviceOn(two.api);
      return d.status === 'online' && d.mqtt_instance === 'ctl-2' && d.current_bundle_version === '1.1.0';
    }, 'dev-m online on instance 2');
    await waitFor(() => two.controller.services.devices.counters.heartbeats > heartbeatsBefore, 'heartbeats on instance 2');
  });

  test('a device moving while its old instance has not noticed yet stays online', async () => {
    // Instance 1 again (restarted; it must not reset the presence instance 2 holds now).
    one = await start('ctl-1', 2_000);
    expect((await deviceOn(one.api)).status).toBe('online');
    const twoPort = two.controller.mqttPort;
    mqttLb.route([one.controller.mqttPort, twoPort]);

    // The link device-to-balancer breaks: the device reconnects (to instance 1)
    // while instance 2 still holds its old connection, until instance 1 takes
    // the session over and instance 2 learns that its client is gone.
    const staleBefore = two.controller.services.devices.counters.staleOffline;
    mqttLb.severDeviceSides();
    await waitFor(async () => (await deviceOn(two.api)).mqtt_instance === 'ctl-1', 'dev-m claimed by instance 1');
    statuses.length = 0;
    await waitFor(() => !two.controller.broker.isDeviceConnected('dev-m'), 'instance 2 to drop its old connection');

    // Past both instances' flushes: still online, everywhere.
    await new Promise((r) => setTimeout(r, 2_500));
    for (const api of [one.api, two.api]) {
      expect(await deviceOn(api)).toEqual(expect.objectContaining({ status: 'online', mqtt_instance: 'ctl-1' }));
    }
    expect(statuses.filter((s) => s.status === 'offline')).toEqual([]);
    // Instance 2 did try to record its old connection's offline, and was refused.
    expect(two.controller.services.devices.counters.staleOffline).toBe(staleBefore + 1);
    const dep = await deploy(two.api, '1.0.0');
    expect(dep.status).toBe('success');
  });
});
