// What a device gets of its unfinished commands when it connects: each once,
// on its subscribe, and, for a device that keeps its broker session and does
// not subscribe again, after a short grace even if the broker's own queue no
// longer holds them.
import { setTimeout as delay } from 'node:timers/promises';
import mqtt, { type MqttClient } from 'mqtt';
import { startTestController, waitFor, type TestController } from './support/controller.js';
import { packBundle, scriptBundle } from './support/bundles.js';
import { registerDevice } from './support/devices.js';
import { hasProgram } from './support/programs.js';
import { startRedis, type RedisServer } from './support/redis.js';
import { SimDevice } from './support/sim-device.js';

/** Longer than the controller's grace for a resubscribe (500 ms). */
const AFTER_GRACE_MS = 1_500;

async function deployTo(tc: TestController, version: string, deviceId: string): Promise<string> {
  expect((await tc.api.upload(await packBundle(scriptBundle(version, '/dev/null')))).status).toBe(201);
  const created = await tc.api.post('/deployments', { bundle_version: version, target_device_ids: [deviceId] });
  expect(created.status).toBe(201);
  return created.body.deployment_id as string;
}

describe('embedded broker', () => {
  let tc: TestController;
  const sims: SimDevice[] = [];
  beforeAll(async () => {
    tc = await startTestController();
  });
  afterAll(async () => {
    await Promise.all(sims.map((s) => s.stop()));
    await tc.stop();
  });

  test('a device connecting with a command pending receives it once, not once for connecting and once for subscribing', async () => {
    const device = await SimDevice.register(tc.controller.httpUrl, 'late-1', tc.creds.enrollment_token, 'hold');
    sims.push(device);
    const id = await deployTo(tc, '1.0.0', 'late-1');
    device.connect(tc.controller.mqttUrl);
    await waitFor(() => device.received.length > 0, 'the pending command');
    await delay(AFTER_GRACE_MS);
    expect(device.received).toEqual([id]);
    // Once it reports, it is finished: nothing more arrives on the next connect.
    device.release();
    await waitFor(async () => (await tc.api.get(`/deployments/${id}`)).body.finished_at, 'the deployment to finish');
  });
});

(hasProgram('redis-server') ? describe : describe.skip)('Redis broker: a kept session', () => {
  let redis: RedisServer;
  let tc: TestController;
  const clients: MqttClient[] = [];
  beforeAll(async () => {
    redis = await startRedis();
    tc = await startTestController({ redisUrl: redis.url });
  });
  afterAll(async () => {
    for (const c of clients) c.end(true);
    await tc?.stop();
    await redis?.stop();
  });

  function connect(deviceId: string, token: string): Promise<{ client: MqttClient; commands: string[] }> {
    const client = mqtt.connect(tc.controller.mqttUrl, {
      clientId: deviceId, username: deviceId, password: token, clean: false, reconnectPeriod: 0, protocolVersion: 4,
    });
    clients.push(client);
    const commands: string[] = [];
    client.on('message', (_topic, payload) => commands.push((JSON.parse(payload.toString()) as { deployment_id: string }).deployment_id));
    return new Promise((resolve, reject) => {
      client.once('connect', () => resolve({ client, commands }));
      client.once('error', reject);
    });
  }

  test('a device that does not subscribe again gets its pending command after the grace, though the broker\'s queue lost it', async () => {
    const reg = await registerDevice(tc.api, 'kept-1', tc.creds.enrollment_token);
    const first = await connect('kept-1', reg.body.token);
    await first.client.subscribeAsync('kernex/devices/kept-1/commands', { qos: 1 });
    await first.client.endAsync();
    await waitFor(() => !tc.controller.broker.isDeviceConnected('kept-1'), 'kept-1 gone');

    // Queued for the absent device in Redis, then lost (as when a controller
    // died between recording the deployment and publishing its commands).
    const id = await deployTo(tc, '2.0.0', 'kept-1');
    const db = redis.client();
    await waitFor(async () => (await db.llen('outgoing:kept-1')) === 1, 'the command queued in Redis');
    await db.del('outgoing:kept-1');
    db.disconnect();

    // Back with its session (and subscription) kept; it does not subscribe again.
    const back = await connect('kept-1', reg.body.token);
    await waitFor(() => back.commands.length > 0, 'the pending command re-sent by the controller');
    await delay(AFTER_GRACE_MS);
    expect(back.commands).toEqual([id]);
  });
});
