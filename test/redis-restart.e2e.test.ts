// The controller on a Redis-backed broker, as a real process that restarts:
// what the broker holds for devices (sessions, a command queued for an
// offline device, the retained config) lives in Redis and outlives it.
import { execFile } from 'node:child_process';
import { mkdtemp, readFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import pino from 'pino';
import { createBroker } from '../broker/index.js';
import { createFleetPublisher } from '../controller/mqtt/publisher.js';
import type { DeviceConfigMessage } from '../schemas/index.js';
import { hasProgram } from './support/programs.js';
import { startRedis, type RedisServer } from './support/redis.js';
import { startControllerProcess, type ControllerProcess } from './support/controller-process.js';
import { startAgentProcess, type AgentProcess } from './support/agent.js';
import { packBundle, scriptBundle } from './support/bundles.js';
import { waitFor } from './support/controller.js';
import { freePort } from './support/ports.js';
import { StateFile } from '../agent/state.js';

const run = hasProgram('redis-server') && hasProgram('mosquitto_sub') ? describe : describe.skip;
const logger = pino({ level: process.env.KERNEX_TEST_LOG ?? 'silent' });

run('controller process on Redis, restarted', () => {
  let redis: RedisServer;
  const servers: ControllerProcess[] = [];
  const agents: AgentProcess[] = [];

  beforeAll(async () => {
    redis = await startRedis();
  });

  afterAll(async () => {
    await Promise.all(agents.map((a) => a.stop()));
    await Promise.all(servers.map((s) => s.kill('SIGTERM')));
    await redis.stop();
  });

  test('an offline device gets the command queued across the restart, and the retained config survives', async () => {
    const [httpPort, mqttPort] = [await freePort(), await freePort()];
    const env = { KERNEX_REDIS_URL: redis.url };
    const first = await startControllerProcess({ httpPort, mqttPort, env });
    servers.push(first);
    const work = await mkdtemp(join(tmpdir(), 'kernex-restart-'));
    const out = join(work, 'deploys.out');

    // A device that connected once (its persistent session is now in Redis), then went away.
    const agent = await startAgentProcess({ deviceId: 'dev-r', server: first.httpUrl, enrollmentToken: first.creds.enrollment_token });
    agents.push(agent);
    await waitFor(async () => (await first.api.get('/devices/dev-r')).body.status === 'online', 'dev-r online');
    await agent.stop();
    await waitFor(async () => (await first.api.get('/devices/dev-r')).body.status === 'offline', 'dev-r offline');

    // A deployment for it while it is away: its command waits in Redis.
    expect((await first.api.upload(await packBundle(scriptBundle('2.0.0', out)))).status).toBe(201);
    const created = await first.api.post('/deployments', { bundle_version: '2.0.0', target_device_ids: ['dev-r'] });
    expect(created.status).toBe(201);
    const deploymentId = created.body.deployment_id as string;
    const db = redis.client();
    const queued = async () => db.llen('outgoing:dev-r');
    await waitFor(async () => (await queued()) === 1, 'the command queued in Redis for dev-r');

    // The controller stops; the retained config is published meanwhile by
    // another broker on the same Redis (no config route exists yet).
    expect(await first.kill('SIGTERM')).toEqual({ code: 0, signal: null });
    expect(await queued()).toBe(1);
    const config: DeviceConfigMessage = {
      config_version: 7, polling_interval: 2, heartbeat_timeout: 30, deploy_timeout: 120, log_level: 'INFO',
    };
    const other = await createBroker({ persistence: { kind: 'redis', url: redis.url } }, {
      authenticate: async () => null, deviceMessage: async () => 'drop',
    }, logger);
    await createFleetPublisher(other, logger).config('dev-r', config);
    await other.close();

    // A new controller process on the same data dir, ports and Redis.
    await first.restart();
    const second = first;

    // Mosquitto's client, as an operator, reads the retained config back.
    const { stdout } = await promisify(execFile)('mosquitto_sub', [
      '-h', '127.0.0.1', '-p', String(mqttPort), '-i', 'ops-reader', '-u', 'ops', '-P', second.creds.token,
      '-t', 'kernex/devices/dev-r/config', '-C', '1', '-W', '10',
    ]);
    expect(JSON.parse(stdout)).toEqual(config);

    // The device comes back: the command queued before the restart runs once.
    const back = await startAgentProcess({
      deviceId: 'dev-r', server: second.httpUrl, enrollmentToken: second.creds.enrollment_token, dataDir: agent.dataDir,
    });
    agents.push(back);
    const done = await waitFor(async () => {
      const d = (await second.api.get(`/deployments/${deploymentId}`)).body;
      return d.finished_at ? d : null;
    }, 'the deployment to finish', 30_000).catch((err: Error) => {
      throw new Error(`${err.message}\nagent:\n${back.output()}\nserver:\n${second.output()}`);
    });
    expect(done.status).toBe('success');
    expect(await readFile(out, 'utf8')).toBe('deploy 2.0.0\n');
    await waitFor(async () => (await queued()) === 0, 'the queue drained once the device acknowledged');
    expect((await second.api.get('/devices/dev-r')).body).toEqual(
      expect.objectContaining({ status: 'online', current_bundle_version: '2.0.0' }),
    );
    // The retained config reached the device too, and it applied it.
    await waitFor(async () => (await StateFile.open(agent.dataDir, 'dev-r')).state.config_version === 7, 'config 7 applied');
    db.disconnect();
  });
});
