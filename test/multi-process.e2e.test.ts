// Two real controller processes (`kernex server`) on one redis-server, a
// real agent behind a TCP balancer, and a SIGKILL.
//
// What is shared here is the broker (Redis), not the store: two processes
// cannot share the embedded store, and no MongoDB server can run on these
// machines. Instance 2 starts from a copy of instance 1's data directory, so
// both know the device, its token, the bundle and the admin token; after that
// their stores are separate. So this test asserts what the broker guarantees
// across processes; the same scenario with one shared store (what MongoDB
// gives in production) is multi-controller.test.ts.
import { spawn, type ChildProcess } from 'node:child_process';
import { cp, mkdtemp, readFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { hasProgram } from './support/programs.js';
import { startRedis, type RedisServer } from './support/redis.js';
import { startControllerProcess, type ControllerProcess } from './support/controller-process.js';
import { startAgentProcess, type AgentProcess } from './support/agent.js';
import { startTcpProxy, type TcpProxy } from './support/proxy.js';
import { packBundle, scriptBundle } from './support/bundles.js';
import { waitFor, type ApiClient } from './support/controller.js';
import { freePort } from './support/ports.js';

const run = hasProgram('redis-server') && hasProgram('mosquitto_sub') ? describe : describe.skip;

run('two controller processes on one Redis', () => {
  let redis: RedisServer;
  let lb: TcpProxy;
  let httpLb: TcpProxy;
  const servers: ControllerProcess[] = [];
  const agents: AgentProcess[] = [];
  let watcher: ChildProcess | undefined;

  beforeAll(async () => {
    redis = await startRedis();
  });

  afterAll(async () => {
    watcher?.kill();
    await Promise.all(agents.map((a) => a.stop()));
    await Promise.all(servers.map((s) => s.kill('SIGTERM')));
    await lb?.close();
    await httpLb?.close();
    await redis?.stop();
  });

  const deployment = async (api: ApiClient, id: string) => (await api.get(`/deployments/${id}`)).body as Record<string, unknown>;

  test('a command through instance 2 reaches the device on instance 1; after a SIGKILL of 1 the device goes to 2, nothing lost', async () => {
    const env = (id: string) => ({ KERNEX_REDIS_URL: redis.url, KERNEX_INSTANCE_ID: id });
    const [http1, mqtt1] = [await freePort(), await freePort()];
    lb = await startTcpProxy([mqtt1]);
    httpLb = await startTcpProxy([http1]);
    const work = await mkdtemp(join(tmpdir(), 'kernex-procs-'));
    const out = join(work, 'deploys.out');

    // Set-up on instance 1 alone: the device registers, the bundles are uploaded.
    const one = await startControllerProcess({ httpPort: http1, mqttPort: mqtt1, env: env('proc-1') });
    servers.push(one);
    const agentArgs = {
      deviceId: 'dev-p', server: `http://127.0.0.1:${httpLb.port}`, enrollmentToken: one.creds.enrollment_token,
      extraArgs: ['--mqtt-url', `mqtt://127.0.0.1:${lb.port}`],
    };
    const first = await startAgentProcess(agentArgs);
    agents.push(first);
    await waitFor(async () => (await one.api.get('/devices/dev-p')).body.status === 'online', 'dev-p online');
    for (const v of ['3.0.0', '3.1.0']) expect((await one.api.upload(await packBundle(scriptBundle(v, out)))).status).toBe(201);
    await first.stop();
    expect(await one.kill('SIGTERM')).toEqual({ code: 0, signal: null });

    // Instance 2 from a copy; both start on the same Redis.
    const copy = join(work, 'instance-2');
    await cp(one.dataDir, copy, { recursive: true });
    await one.restart();
    const two = await startControllerProcess({ dataDir: copy, env: env('proc-2') });
    servers.push(two);
    lb.route([one.mqttPort, two.mqttPort]);
    httpLb.route([one.httpPort, two.httpPort]);

    const agent = await startAgentProcess({ ...agentArgs, dataDir: first.dataDir });
    agents.push(agent);
    await waitFor(async () => (await one.api.get('/devices/dev-p')).body.status === 'online', 'dev-p online on instance 1');
    expect(lb.connections()).toEqual([{ target: one.mqttPort }]);

    // An operator watches the device's results through instance 2 (Mosquitto's client).
    let results = '';
    watcher = spawn('mosquitto_sub', [
      '-h', '127.0.0.1', '-p', String(two.mqttPort), '-i', 'results-watcher', '-u', 'ops', '-P', two.creds.token,
      '-t', 'kernex/devices/dev-p/results', '-q', '1',
    ], { stdio: ['ignore', 'pipe', 'ignore'] });
    watcher.stdout!.on('data', (d: Buffer) => (results += d.toString()));
    await new Promise((r) => setTimeout(r, 300));

    // A deployment created through instance 2 reaches the device on instance 1.
    const created = await two.api.post('/deployments', { bundle_version: '3.0.0', target_device_ids: ['dev-p'] });
    expect(created.status).toBe(201);
    const d1 = created.body.deployment_id as string;
    const reports = (id: string) => results.trim().split('\n').filter(Boolean).map((l) => JSON.parse(l) as Record<string, unknown>)
      .filter((r) => r.deployment_id === id);
    const outcomes = (id: string) => reports(id).filter((r) => r.status !== 'in_progress');
    await waitFor(() => outcomes(d1).length > 0, 'the outcome of deployment 1, seen through instance 2');
    expect(await readFile(out, 'utf8')).toBe('deploy 3.0.0\n');
    await new Promise((r) => setTimeout(r, 500));
    expect(outcomes(d1)).toEqual([expect.objectContaining({ status: 'success' })]);

    // Each report (progress and outcome) was processed once, by instance 1,
    // the device's instance (whose store does not know deployment 1), and
    // not by instance 2 (where deployment 1 stays pending).
    const processedByOne = () => one.output().split('\n').filter((l) => l.includes(d1) && l.includes('unknown deployment')).length;
    expect(reports(d1).length).toBeGreaterThan(1);
    expect(processedByOne()).toBe(reports(d1).length);
    expect(await deployment(two.api, d1)).toEqual(expect.objectContaining({ status: 'pending', finished: 0 }));
    expect((await two.api.get('/devices/dev-p')).body.status).toBe('offline');

    // Instance 1 dies. A deployment created right then waits in Redis.
    await one.kill('SIGKILL');
    const again = await two.api.post('/deployments', { bundle_version: '3.1.0', target_device_ids: ['dev-p'] });
    expect(again.status).toBe(201);
    const d2 = again.body.deployment_id as string;

    // The device reaches instance 2 through the balancers (over MQTT, or
    // over its HTTP fallback until MQTT is back), and instance 2 receives
    // both outcomes: the new deployment's, and deployment 1's again (re-sent
    // by instance 2 as still pending; answered from the agent's record, not
    // run again).
    await waitFor(async () => (await deployment(two.api, d2)).finished_at, 'deployment 2 to finish', 30_000)
      .catch((err: Error) => {
        throw new Error(`${err.message}\nagent:\n${agent.output()}\ninstance 2:\n${two.output()}`);
      });
    await waitFor(async () => (await deployment(two.api, d1)).finished_at, 'deployment 1 to be recorded on instance 2');
    expect(await deployment(two.api, d1)).toEqual(expect.objectContaining({ status: 'success' }));
    expect(await deployment(two.api, d2)).toEqual(expect.objectContaining({ status: 'success' }));
    expect(await readFile(out, 'utf8')).toBe('deploy 3.0.0\ndeploy 3.1.0\n');
    // The agent may have done that over its HTTP fallback; its MQTT connection
    // comes back through the balancer, to instance 2.
    await waitFor(() => lb.connections().length === 1, 'the MQTT connection back', 30_000);
    expect(lb.connections()).toEqual([{ target: two.mqttPort }]);
    await waitFor(async () => {
      const d = (await two.api.get('/devices/dev-p')).body;
      return d.status === 'online' && d.mqtt_instance === 'proc-2' ? d : null;
    }, 'dev-p online on instance 2').catch(async (err: Error) => {
      throw new Error(`${err.message}: ${JSON.stringify((await two.api.get('/devices/dev-p')).body)}`);
    });
  });
});
