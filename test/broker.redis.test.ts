// The broker on Redis, in process: two brokers on one redis-server behave as
// one (cross-instance delivery, shared sessions and retained messages), and
// closing a broker releases its Redis connections.
import mqtt, { type MqttClient } from 'mqtt';
import pino from 'pino';
import type { AddressInfo } from 'node:net';
import { createBroker, PersistenceUnavailableError, type Broker, type BrokerHooks } from '../broker/index.js';
import { hasProgram } from './support/programs.js';
import { startRedis, type RedisServer } from './support/redis.js';
import { waitFor } from './support/controller.js';
import { freePort } from './support/ports.js';

const logger = pino({ level: process.env.KERNEX_TEST_LOG ?? 'silent' });
const run = hasProgram('redis-server') ? describe : describe.skip;

run('broker persistence on Redis', () => {
  let redis: RedisServer;
  const brokers: Broker[] = [];
  const clients: MqttClient[] = [];
  const handled: Array<{ broker: number; deviceId: string; channel: string }> = [];

  const hooks = (n: number): BrokerHooks => ({
    authenticate: async (clientId, username) => (username === clientId ? { kind: 'device', deviceId: clientId } : null),
    deviceMessage: async (deviceId, channel) => {
      handled.push({ broker: n, deviceId, channel });
      return 'accept';
    },
  });

  async function broker(n: number): Promise<{ broker: Broker; port: number }> {
    const b = await createBroker({ persistence: { kind: 'redis', url: redis.url } }, hooks(n), logger);
    brokers.push(b);
    const address: AddressInfo = await b.listenTcp(0, '127.0.0.1');
    return { broker: b, port: address.port };
  }

  function device(id: string, port: number): Promise<MqttClient> {
    const c = mqtt.connect(`mqtt://127.0.0.1:${port}`, {
      clientId: id, username: id, password: 'x', clean: false, reconnectPeriod: 0, protocolVersion: 4,
    });
    clients.push(c);
    return new Promise((resolve, reject) => {
      c.once('connect', () => resolve(c));
      c.once('error', reject);
    });
  }

  const subscribe = (c: MqttClient, topic: string) =>
    new Promise<void>((resolve, reject) => c.subscribe(topic, { qos: 1 }, (err) => (err ? reject(err) : resolve())));
  const received = (c: MqttClient) => {
    const messages: Array<{ topic: string; payload: string; retain: boolean }> = [];
    c.on('message', (topic, payload, packet) => messages.push({ topic, payload: payload.toString(), retain: packet.retain }));
    return messages;
  };
  const end = (c: MqttClient) => new Promise<void>((r) => c.end(false, {}, () => r()));

  beforeAll(async () => {
    redis = await startRedis();
  });

  afterAll(async () => {
    await Promise.all(clients.map((c) => new Promise<void>((r) => c.end(true, {}, () => r()))));
    await Promise.all(brokers.map((b) => b.close()));
    await redis.stop();
  });

  test('a command published on one broker reaches a device connected to another, once', async () => {
    const one = await broker(1);
    const two = await broker(2);
    const dev = await device('dev-a', one.port);
    const messages = received(dev);
    await subscribe(dev, 'kernex/devices/dev-a/commands');

    await two.broker.publish('kernex/devices/dev-a/commands', { n: 1 }, { qos: 1 });
    await waitFor(() => messages.length >= 1, 'the command on the device');
    // Anything duplicated through Redis would arrive right behind the first copy.
    await new Promise((r) => setTimeout(r, 300));
    expect(messages).toEqual([{ topic: 'kernex/devices/dev-a/commands', payload: '{"n":1}', retain: false }]);

    // A device's own message is handled by the broker it is connected to, only.
    await new Promise<void>((resolve, reject) =>
      dev.publish('kernex/devices/dev-a/heartbeat', '{}', { qos: 1 }, (err) => (err ? reject(err) : resolve())));
    await new Promise((r) => setTimeout(r, 300));
    expect(handled.filter((h) => h.deviceId === 'dev-a')).toEqual([{ broker: 1, deviceId: 'dev-a', channel: 'heartbeat' }]);
  });

  test('a QoS 1 message queued while a device was away reaches it on another broker', async () => {
    const one = await broker(1);
    const two = await broker(2);
    const first = await device('dev-b', one.port);
    await subscribe(first, 'kernex/devices/dev-b/commands');
    await end(first);

    await one.broker.publish('kernex/devices/dev-b/commands', { queued: true }, { qos: 1 });

    const again = mqtt.connect(`mqtt://127.0.0.1:${two.port}`, {
      clientId: 'dev-b', username: 'dev-b', password: 'x', clean: false, reconnectPeriod: 0, protocolVersion: 4,
    });
    clients.push(again);
    const messages = received(again);
    await waitFor(() => messages.length >= 1, 'the queued command after reconnecting elsewhere');
    expect(messages[0]).toEqual({ topic: 'kernex/devices/dev-b/commands', payload: '{"queued":true}', retain: false });
  });

  test('retained messages outlive the broker that stored them', async () => {
    const one = await broker(1);
    await one.broker.publish('kernex/devices/dev-c/config', { config_version: 3 }, { qos: 1, retain: true });
    await one.broker.close();

    const three = await broker(3);
    const dev = await device('dev-c', three.port);
    const messages = received(dev);
    await subscribe(dev, 'kernex/devices/dev-c/config');
    await waitFor(() => messages.length >= 1, 'the retained config');
    expect(messages[0]).toEqual({ topic: 'kernex/devices/dev-c/config', payload: '{"config_version":3}', retain: true });
  });

  test('a persistent session subscribing to several topics at once gets its SUBACK, every time', async () => {
    // What the agent does on each connection: commands and config in one SUBSCRIBE.
    const { port } = await broker(1);
    for (let attempt = 1; attempt <= 3; attempt++) {
      const c = await device('dev-s', port);
      const granted = await new Promise<number[]>((resolve, reject) =>
        c.subscribe(['kernex/devices/dev-s/commands', 'kernex/devices/dev-s/config'], { qos: 1 },
          (err, g) => (err ? reject(err) : resolve((g ?? []).map((x) => x.qos)))));
      expect(granted).toEqual([1, 1]);
      await end(c);
    }
  });

  test('brokers on one Redis know which of them are alive', async () => {
    const make = async () => {
      const b = await createBroker({ persistence: { kind: 'redis', url: redis.url }, heartbeatIntervalMs: 200 }, hooks(7), logger);
      brokers.push(b);
      return b;
    };
    const a = await make();
    const b = await make();
    await waitFor(() => a.peers().includes(b.id) && b.peers().includes(a.id), 'each to hear the other');
    await b.close();
    await waitFor(() => !a.peers().includes(b.id), 'a closed broker to fall silent', 5_000);
    expect(a.peers()).toContain(a.id);
  });

  test('closing a broker releases its Redis connections', async () => {
    const admin = redis.client();
    const count = async () => ((await admin.client('LIST')) as string).split('\n').filter((l) => l.includes('name=kernex-')).length;
    const before = await count();
    const b = await createBroker({ persistence: { kind: 'redis', url: redis.url } }, hooks(9), logger);
    expect(await count()).toBe(before + 3);
    await b.close();
    await waitFor(async () => (await count()) === before, 'connections closed', 5_000);
    admin.disconnect();
  });

  test('an unreachable Redis fails start-up with a message that names it, password hidden', async () => {
    const port = await freePort();
    const err = await createBroker(
      { persistence: { kind: 'redis', url: `redis://:s3cret@127.0.0.1:${port}`, connectTimeoutMs: 1_000 } }, hooks(0), logger,
    ).then(() => null, (e: Error) => e);
    expect(err).toBeInstanceOf(PersistenceUnavailableError);
    expect(err!.message).toContain(`redis://***@127.0.0.1:${port}`);
    expect(err!.message).toContain('KERNEX_REDIS_URL');
    expect(err!.message).not.toContain('s3cret');
  });
});
