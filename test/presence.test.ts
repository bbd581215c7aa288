// Presence when several controllers share a store: each MQTT connection
// claims its device with a new generation; what an instance writes about an
// older connection (late heartbeats, a late "offline") no longer applies.
// Two DeviceServices over one embedded store, driven step by step, so every
// interleaving here is deterministic.
import pino from 'pino';
import { openStore, type BulkUpdate, type Collection, type Store } from '../controller/store/index.js';
import { openRepositories, type DeviceDoc, type Repositories } from '../controller/model.js';
import { DeviceService } from '../controller/services/devices.js';
import { TokenService } from '../controller/services/tokens.js';
import type { FleetPublisher } from '../controller/mqtt/publisher.js';
import type { DeviceStatusMessage } from '../schemas/index.js';

const logger = pino({ level: 'silent' });
let store: Store;
let repos: Repositories;
const started: DeviceService[] = [];

function instance(id: string, collectionOverride?: Collection<DeviceDoc>) {
  const statuses: DeviceStatusMessage[] = [];
  const publisher: FleetPublisher = {
    command: async () => {}, config: async () => {}, event: async () => {},
    status: async (m) => {
      statuses.push(m);
    },
  };
  const r = collectionOverride ? { ...repos, devices: collectionOverride } : repos;
  // A flush period no test waits for: flushes happen when a test calls flush().
  const devices = new DeviceService(r, new TokenService(r, logger), publisher, logger, { flushMs: 3_600_000, instanceId: id });
  return { devices, statuses };
}

/** A registered device, as registration stores it (registration itself is tested elsewhere). */
async function register(deviceId: string) {
  const at = new Date().toISOString();
  await repos.devices.insertOne({
    _id: `id-${deviceId}`, device_id: deviceId, public_key: `key-${deviceId}`, token_hash: null, status: 'offline',
    connection: null, mqtt_instance: null, mqtt_generation: 0, last_heartbeat: null, current_bundle_version: null,
    config_version: null, uptime: null, metrics: null, hardware_id: null, metadata: null, revoked_at: null,
    created_at: at, updated_at: at,
  });
}

const doc = async (deviceId: string) => (await repos.devices.findOne({ device_id: deviceId }))!;
const hb = (uptime: number) => ({ status: 'online' as const, bundle_version: '1.0.0', config_version: 0, uptime });

beforeEach(async () => {
  store = await openStore({ dataDir: '/nonexistent', inMemory: true });
  repos = await openRepositories(store);
});

afterEach(async () => {
  await Promise.all(started.splice(0).map((d) => d.stop()));
  await store.close();
});

test('a connection that ended is written offline, and said so', async () => {
  await register('d1');
  const a = instance('A');
  await a.devices.connected('d1');
  expect(await doc('d1')).toEqual(expect.objectContaining({ status: 'online', mqtt_instance: 'A', mqtt_generation: 1 }));
  a.devices.disconnected('d1');
  await a.devices.flush();
  expect((await doc('d1')).status).toBe('offline');
  expect(a.statuses.map((s) => s.status)).toEqual(['online', 'offline']);
  expect((await a.devices.get('d1')).status).toBe('offline');
});

test('an old instance learning late that the device left cannot mark it offline', async () => {
  await register('d1');
  const a = instance('A');
  const b = instance('B');
  await a.devices.connected('d1');
  await b.devices.connected('d1'); // the device moved to B
  a.devices.disconnected('d1'); // A notices only now
  await a.devices.flush();

  expect(await doc('d1')).toEqual(expect.objectContaining({ status: 'online', mqtt_instance: 'B', mqtt_generation: 2 }));
  expect(a.devices.counters.staleOffline).toBe(1);
  expect(a.statuses.map((s) => s.status)).toEqual(['online']);
  // Neither instance's API shows it offline.
  expect((await a.devices.get('d1')).status).toBe('online');
  expect((await b.devices.get('d1')).status).toBe('online');
});

test('when the old instance writes offline first, the new connection still ends online', async () => {
  await register('d1');
  const a = instance('A');
  const b = instance('B');
  await a.devices.connected('d1');
  a.devices.disconnected('d1');
  await a.devices.flush();
  await b.devices.connected('d1');
  expect(await doc('d1')).toEqual(expect.objectContaining({ status: 'online', mqtt_instance: 'B' }));
  expect((await a.devices.get('d1')).status).toBe('online');
});

test('heartbeats an old instance still buffers do not overwrite the new instance\'s', async () => {
  await register('d1');
  const a = instance('A');
  const b = instance('B');
  await a.devices.connected('d1');
  a.devices.heartbeat('d1', hb(10), 'mqtt');
  await b.devices.connected('d1');
  b.devices.heartbeat('d1', hb(99), 'mqtt');
  await b.devices.flush();
  await a.devices.flush(); // late, with the older connection's heartbeat
  expect(await doc('d1')).toEqual(expect.objectContaining({ uptime: 99, mqtt_instance: 'B', status: 'online' }));
  expect((await a.devices.get('d1')).uptime).toBe(99);
});

test('a restarted instance resets only the presence it held', async () => {
  for (const id of ['d1', 'd2']) await register(id);
  await instance('A').devices.connected('d1');
  await instance('B').devices.connected('d2');
  const restartedA = instance('A');
  started.push(restartedA.devices);
  await restartedA.devices.start('own');
  expect((await doc('d1')).status).toBe('offline');
  expect((await doc('d2')).status).toBe('online');
});

test('one flush writes every buffered heartbeat in one batch', async () => {
  const ids = Array.from({ length: 50 }, (_, i) => `dev-${i}`);
  for (const id of ids) await register(id);
  const batches: BulkUpdate[][] = [];
  const devices = repos.devices;
  const counting: Collection<DeviceDoc> = Object.assign(Object.create(devices) as Collection<DeviceDoc>, {
    bulkUpdate: (ops: BulkUpdate[]) => {
      batches.push(ops);
      return devices.bulkUpdate(ops);
    },
  });
  const a = instance('A', counting);
  for (const id of ids) await a.devices.connected(id);
  for (let round = 0; round < 3; round++) for (const id of ids) a.devices.heartbeat(id, hb(round), 'mqtt');
  await a.devices.flush();
  expect(batches).toHaveLength(1);
  expect(batches[0]).toHaveLength(50);
  expect((await doc('dev-49')).uptime).toBe(2);
});

test('devices of an instance that is gone are swept offline by another, once quiet long enough', async () => {
  for (const id of ['d1', 'd2']) await register(id);
  const a = instance('A');
  const b = instance('B');
  await a.devices.connected('d1');
  await b.devices.connected('d2');

  // A is silent (killed), but d1 was heard from too recently to conclude anything.
  expect(await b.devices.sweepOrphans(['B'], 60_000)).toBe(0);
  expect((await doc('d1')).status).toBe('online');

  await new Promise((r) => setTimeout(r, 20));
  expect(await b.devices.sweepOrphans(['B'], 10)).toBe(1);
  expect(await doc('d1')).toEqual(expect.objectContaining({ status: 'offline', mqtt_instance: 'A', mqtt_generation: 1 }));
  expect((await doc('d2')).status).toBe('online');
  expect(b.statuses.filter((s) => s.device_id === 'd1').map((s) => s.status)).toEqual(['offline']);
  // Nothing left to sweep; A alive again would have kept it.
  expect(await b.devices.sweepOrphans(['B'], 10)).toBe(0);

  // d1 comes back (through B): the sweep does not touch a live connection.
  await b.devices.connected('d1');
  await new Promise((r) => setTimeout(r, 20));
  expect(await b.devices.sweepOrphans(['B'], 10)).toBe(0);
  expect((await doc('d1')).status).toBe('online');
});
