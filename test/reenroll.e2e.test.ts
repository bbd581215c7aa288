// An agent whose token the controller no longer accepts registers again with
// its own key and carries on, over MQTT and over the HTTP fallback; a revoked
// device does not get back in that way.
import { loadIdentity } from '../agent/identity.js';
import { startTestController, waitFor, type TestController } from './support/controller.js';
import { startAgentProcess, type AgentProcess } from './support/agent.js';
import { registerDevice } from './support/devices.js';
import { freePort } from './support/ports.js';

let tc: TestController;
let closedPort: number;
const agents: AgentProcess[] = [];

beforeAll(async () => {
  tc = await startTestController();
  // A port nothing listens on: the "unreachable broker".
  closedPort = await freePort();
});
afterAll(async () => {
  await Promise.all(agents.map((a) => a.stop()));
  await tc.stop();
});

const registrations = (a: AgentProcess) => a.output().split('registered with the controller').length - 1;
const device = async (id: string) => (await tc.api.get(`/devices/${id}`)).body as Record<string, unknown>;

/** Takes the device's token away from the agent the way a second registration with its key does. */
async function replaceToken(a: AgentProcess): Promise<void> {
  const identity = await loadIdentity(a.dataDir);
  const res = await registerDevice(tc.api, a.deviceId, tc.creds.enrollment_token, identity);
  expect(res.status).toBe(200);
}

async function start(deviceId: string, extraArgs: string[] = []): Promise<AgentProcess> {
  const a = await startAgentProcess({ deviceId, server: tc.controller.httpUrl, enrollmentToken: tc.creds.enrollment_token, extraArgs });
  agents.push(a);
  await waitFor(async () => (await device(deviceId)).status === 'online', `${deviceId} online`).catch((err: Error) => {
    throw new Error(`${err.message}\nagent output:\n${a.output()}`);
  });
  return a;
}

test('over MQTT: the connection is closed, the agent is refused, registers again and is back online', async () => {
  const a = await start('re-mqtt');
  expect(registrations(a)).toBe(1);
  await replaceToken(a);
  await waitFor(() => registrations(a) === 2, 'the agent to register again').catch((err: Error) => {
    throw new Error(`${err.message}\nagent output:\n${a.output()}`);
  });
  const after = Date.now();
  await waitFor(async () => {
    const d = await device('re-mqtt');
    return d.status === 'online' && d.connection === 'mqtt' && Date.parse(String(d.last_heartbeat)) > after;
  }, 're-mqtt heartbeating over MQTT again').catch(async (err: Error) => {
    throw new Error(`${err.message}\n${JSON.stringify(await device('re-mqtt'))}\nagent output:\n${a.output().slice(-5000)}`);
  });
  expect(tc.controller.broker.isDeviceConnected('re-mqtt')).toBe(true);
});

test('over the HTTP fallback: a 401 heartbeat makes the agent register again, and heartbeats go on', async () => {
  const a = await start('re-http', ['--mqtt-url', `mqtt://127.0.0.1:${closedPort}`]);
  await waitFor(async () => (await device('re-http')).connection === 'http', 're-http on HTTP');
  await replaceToken(a);
  await waitFor(() => a.output().includes('heartbeat refused (HTTP 401)'), 'a refused heartbeat');
  await waitFor(() => registrations(a) === 2, 'the agent to register again').catch((err: Error) => {
    throw new Error(`${err.message}\nagent output:\n${a.output()}`);
  });
  const after = Date.now();
  await waitFor(async () => Date.parse(String((await device('re-http')).last_heartbeat)) > after, 'a heartbeat with the new token');
});

test('a revoked device is refused for good: one attempt to register again, refused, no loop', async () => {
  const a = await start('re-revoked');
  expect((await tc.api.post('/devices/re-revoked/revoke')).status).toBe(200);
  await waitFor(() => a.output().includes('re-enrollment failed'), 'the refused re-registration').catch((err: Error) => {
    throw new Error(`${err.message}\nagent output:\n${a.output()}`);
  });
  expect(a.output()).toMatch(/registration refused \(403\): device re-revoked has been revoked/);
  expect(registrations(a)).toBe(1);
  expect(await device('re-revoked')).toMatchObject({ status: 'offline', revoked_at: expect.any(String) });
});
