// A command goes straight to the device's own connection when nobody else can
// read it (the fan-out's fast path), and through the broker's topic matching
// whenever an operator holds a subscription on commands, live or in a
// persistent session: such a reader gets every command either way.
import mqtt, { type MqttClient } from 'mqtt';
import { startTestController, waitFor, type TestController } from './support/controller.js';
import { packBundle, scriptBundle } from './support/bundles.js';
import { SimDevice } from './support/sim-device.js';

let tc: TestController;
const sims: SimDevice[] = [];
let bundleVersion: string;
/** Commands that went through Aedes' own publish (topic matching, message bus). */
const routed: string[] = [];

beforeAll(async () => {
  tc = await startTestController();
  for (const id of ['cmd-a', 'cmd-b']) {
    const d = await SimDevice.register(tc.controller.httpUrl, id, tc.creds.enrollment_token);
    d.connect(tc.controller.mqttUrl);
    sims.push(d);
  }
  await waitFor(() => sims.every((d) => tc.controller.broker.isDeviceConnected(d.deviceId)), 'devices connected');
  // Their SUBSCRIBE is in when a command published now reaches them.
  await waitFor(async () => {
    const res = await tc.api.get('/devices?status=online');
    return res.body.length === 2;
  }, 'devices online');
  const res = await tc.api.upload(await packBundle(scriptBundle('1.0.0', '/dev/null')));
  expect(res.status).toBe(201);
  bundleVersion = res.body.version;
  tc.controller.broker.aedes.on('publish', (packet) => {
    if (packet.topic.endsWith('/commands')) routed.push(packet.topic);
  });
});

afterAll(async () => {
  await Promise.all(sims.map((s) => s.stop()));
  await tc.stop();
});

async function operator(clientId: string, clean: boolean): Promise<{ client: MqttClient; commands: string[] }> {
  const client = await mqtt.connectAsync(tc.controller.mqttUrl, {
    clientId, username: 'ops', password: tc.creds.token, clean, reconnectPeriod: 0,
  });
  const commands: string[] = [];
  client.on('message', (topic, payload) => {
    if (topic.endsWith('/commands')) commands.push(`${topic} ${JSON.parse(payload.toString()).deployment_id}`);
  });
  return { client, commands };
}

async function deployAndWait(): Promise<string> {
  const res = await tc.api.post('/deployments', { bundle_version: bundleVersion, target_device_ids: sims.map((d) => d.deviceId) });
  expect(res.status).toBe(201);
  const id = res.body.deployment_id as string;
  await waitFor(() => sims.every((d) => d.received.includes(id)), 'both devices received the command');
  await waitFor(async () => (await tc.api.get(`/deployments/${id}`)).body.finished_at, 'deployment finished');
  return id;
}

test('with no other reader, commands go to the devices directly, and each device gets its command once', async () => {
  routed.length = 0;
  const id = await deployAndWait();
  for (const d of sims) expect(d.received.filter((r) => r === id)).toHaveLength(1);
  expect(routed).toEqual([]);
});

test('an operator subscribed to every device\'s commands sees the fan-out as the devices get it', async () => {
  const { client, commands } = await operator('ops-live', true);
  try {
    expect((await client.subscribeAsync('kernex/devices/+/commands', { qos: 1 }))[0]!.qos).toBe(1);
    routed.length = 0;
    const id = await deployAndWait();
    await waitFor(() => commands.length === 2, 'the operator saw both commands');
    expect(commands.sort()).toEqual(sims.map((d) => `kernex/devices/${d.deviceId}/commands ${id}`).sort());
    expect(routed).toHaveLength(2);
  } finally {
    await client.endAsync();
  }
  // Its clean session ended with it: the direct path is back.
  routed.length = 0;
  await deployAndWait();
  expect(routed).toEqual([]);
});

test('an operator\'s persistent session gets the commands published while it was away', async () => {
  const first = await operator('ops-persistent', false);
  await first.client.subscribeAsync('kernex/devices/cmd-a/commands', { qos: 1 });
  await first.client.endAsync();
  const id = await deployAndWait();
  const back = await operator('ops-persistent', false);
  try {
    await waitFor(() => back.commands.length === 1, 'the queued command reached the operator');
    expect(back.commands).toEqual([`kernex/devices/cmd-a/commands ${id}`]);
  } finally {
    await back.client.endAsync();
  }
});
