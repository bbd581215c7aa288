// Transport security: HTTPS and MQTT over TLS when a certificate is configured,
// MQTT over WebSocket (wss:// with TLS, ws:// without), and clients that trust
// the wrong CA refused. Certificates come from the openssl CLI.
import { execFile } from 'node:child_process';
import { copyFile, mkdtemp, readFile, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { Agent, FormData as UndiciFormData, fetch as undiciFetch } from 'undici';
import { loadControllerConfig, ConfigError } from '../controller/index.js';
import { startTestController, waitFor, type TestController } from './support/controller.js';
import { deviceKey, proof, registerDevice } from './support/devices.js';
import { mqttConnect, subscribeGranted } from './support/hostile.js';
import { startAgentProcess, type AgentProcess } from './support/agent.js';
import { packBundle, scriptBundle } from './support/bundles.js';
import { hasProgram } from './support/programs.js';
import { makeTestCerts, type TestCerts } from './support/tls.js';
import { startControllerProcess } from './support/controller-process.js';

const run = promisify(execFile);
const enabled = hasProgram('openssl');
const describeIf = enabled ? describe : describe.skip;

describeIf('TLS', () => {
  let certs: TestCerts;
  let tc: TestController;
  let ca: string;
  let otherCa: string;
  const agents: AgentProcess[] = [];

  beforeAll(async () => {
    certs = await makeTestCerts();
    ca = await readFile(certs.ca, 'utf8');
    otherCa = await readFile(certs.otherCa, 'utf8');
    const fromEnv = loadControllerConfig({}, { KERNEX_TLS_CERT: certs.cert, KERNEX_TLS_KEY: certs.key });
    tc = await startTestController({ tls: fromEnv.tls, mqttsPort: 0 });
  });
  afterAll(async () => {
    await Promise.all(agents.map((a) => a.stop()));
    await tc?.stop();
  });

  const https = (trust: string) => (path: string) =>
    undiciFetch(`${tc.controller.httpUrl}/api/v1${path}`, { dispatcher: new Agent({ connect: { ca: trust } }) });

  test('configuration: both files are needed, and they must be PEM', () => {
    expect(() => loadControllerConfig({}, { KERNEX_TLS_CERT: certs.cert })).toThrow(/both KERNEX_TLS_CERT and KERNEX_TLS_KEY/);
    expect(() => loadControllerConfig({}, { KERNEX_TLS_CERT: certs.key, KERNEX_TLS_KEY: certs.key })).toThrow(ConfigError);
    expect(() => loadControllerConfig({}, { KERNEX_TLS_CERT: join(certs.dir, 'nope.pem'), KERNEX_TLS_KEY: certs.key }))
      .toThrow(/cannot read/);
  });

  test('HTTPS: the right CA connects, a wrong CA is refused, plain HTTP gets nothing', async () => {
    expect(tc.controller.httpUrl).toMatch(/^https:/);
    const ok = await https(ca)('/health');
    expect(ok.status).toBe(200);
    await expect(https(otherCa)('/health')).rejects.toThrow();
    await expect(fetch(`${tc.controller.httpUrl.replace('https:', 'http:')}/api/v1/health`)).rejects.toThrow();
  });

  test('MQTT over TLS: the right CA connects, a wrong CA is refused; registration hands out mqtts://', async () => {
    const key = deviceKey();
    const reg = await undiciFetch(`${tc.controller.httpUrl}/api/v1/devices/register`, {
      method: 'POST', dispatcher: new Agent({ connect: { ca } }), headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ device_id: 'tls-dev', public_key: key.publicKeyPem, enrollment_token: tc.creds.enrollment_token,
        ...proof(key, 'tls-dev') }),
    });
    const registered = (await reg.json()) as { token: string; mqtt_url: string };
    expect(reg.status).toBe(201);
    const url = tc.controller.mqttsUrl!;
    expect(registered.mqtt_url).toBe(url);
    const device = await mqttConnect(url, { clientId: 'tls-dev', username: 'tls-dev', password: registered.token, ca });
    await device.publishAsync('kernex/devices/tls-dev/heartbeat', JSON.stringify({ status: 'online' }), { qos: 1 });
    await device.endAsync(true);
    expect(url).toMatch(/^mqtts:\/\/127\.0\.0\.1:\d+$/);
    const good = await mqttConnect(url, { clientId: 'ops-tls', username: 'ops', password: tc.creds.token, ca });
    expect(await subscribeGranted(good, ['kernex/devices/+/status'])).toEqual([1]);
    await good.endAsync(true);
    await expect(mqttConnect(url, { clientId: 'ops-tls-2', username: 'ops', password: tc.creds.token, ca: otherCa }))
      .rejects.toThrow(/certificate|self.signed|unable to verify/i);
  });

  test('MQTT over secure WebSocket on the HTTPS port', async () => {
    expect(tc.controller.wsUrl).toMatch(/^wss:\/\/127\.0\.0\.1:\d+\/mqtt$/);
    const client = await mqttConnect(tc.controller.wsUrl!, { clientId: 'ops-wss', username: 'ops', password: tc.creds.token, ca });
    expect(await subscribeGranted(client, ['kernex/events/#'])).toEqual([1]);
    await client.endAsync(true);
    await expect(mqttConnect(tc.controller.wsUrl!, { clientId: 'ops-wss-2', username: 'ops', password: tc.creds.token, ca: otherCa }))
      .rejects.toThrow();
  });

  test('mosquitto_sub trusting the right CA receives; trusting another CA it is refused', async () => {
    if (!hasProgram('mosquitto_sub')) return;
    const port = String(tc.controller.mqttsPort);
    await run('mosquitto_sub', ['-h', '127.0.0.1', '-p', port, '--cafile', certs.ca, '-u', 'ops', '-P', tc.creds.token,
      '-t', 'kernex/devices/+/status', '-W', '1', '-C', '1']).catch((err: { code?: number; stderr?: string }) => {
      // Timing out after 1 s without a message (exit 27) still means the TLS login worked.
      expect(err.code).toBe(27);
    });
    await expect(run('mosquitto_sub', ['-h', '127.0.0.1', '-p', port, '--cafile', certs.otherCa, '-u', 'ops', '-P', tc.creds.token,
      '-t', 'kernex/devices/+/status', '-W', '2', '-C', '1'])).rejects.toMatchObject({ stderr: expect.stringMatching(/certificate|TLS|handshake|protocol/i) });
  });

  test('an agent with --ca-file enrolls over HTTPS, connects over MQTT/TLS and deploys', async () => {
    const agent = await startAgentProcess({
      deviceId: 'tls-agent', server: tc.controller.httpUrl, enrollmentToken: tc.creds.enrollment_token,
      extraArgs: ['--ca-file', certs.ca],
    });
    agents.push(agent);
    const get = https(ca);
    const admin = { authorization: `Bearer ${tc.creds.token}` };
    const api = (path: string, init: { method?: string; body?: unknown } = {}) =>
      undiciFetch(`${tc.controller.httpUrl}/api/v1${path}`, {
        method: init.method ?? 'GET', dispatcher: new Agent({ connect: { ca } }),
        headers: { ...admin, ...(init.body && !(init.body instanceof UndiciFormData) ? { 'content-type': 'application/json' } : {}) },
        body: init.body instanceof UndiciFormData ? init.body : init.body ? JSON.stringify(init.body) : undefined,
      }).then(async (r) => ({ status: r.status, body: (await r.json()) as any }));
    await waitFor(async () => (await api('/devices/tls-agent')).body.status === 'online', 'agent online over TLS')
      .catch((err: Error) => {
        throw new Error(`${err.message}\n${agent.output()}`);
      });
    // Its log names the URL it connected to (logged just after the broker saw it connect).
    await waitFor(() => /"mqttUrl":"mqtts:\/\/127\.0\.0\.1:\d+"/.test(agent.output()), 'the agent to log its mqtts:// connection');
    const form = new UndiciFormData();
    form.append('file', new Blob([await packBundle(scriptBundle('1.0.0', '/dev/null'))]), 'b.tar.gz');
    expect((await api('/bundles', { method: 'POST', body: form })).status).toBe(201);
    const created = await api('/deployments', { method: 'POST', body: { bundle_version: '1.0.0', target_device_ids: ['tls-agent'] } });
    const dep = await waitFor(async () => {
      const d = (await api(`/deployments/${created.body.deployment_id}`)).body;
      return d.finished_at ? d : null;
    }, 'deployment over TLS', 30_000);
    expect(dep.status).toBe('success');
    expect((await get('/health')).status).toBe(200);
  });

  test('an agent trusting another CA cannot enroll', async () => {
    const agent = await startAgentProcess({
      deviceId: 'tls-wrong', server: tc.controller.httpUrl, enrollmentToken: tc.creds.enrollment_token,
      extraArgs: ['--ca-file', certs.otherCa],
    });
    agents.push(agent);
    const code = await new Promise<number | null>((r) => agent.child.once('exit', (c) => r(c)));
    expect(code).not.toBe(0);
    expect(agent.output()).toMatch(/cannot reach the controller|certificate|fetch failed/i);
  });
});

describe('MQTT over WebSocket without TLS', () => {
  test('ws:// at /mqtt on the HTTP port, with the same ACL', async () => {
    const tc = await startTestController();
    try {
      expect(tc.controller.wsUrl).toMatch(/^ws:\/\/127\.0\.0\.1:\d+\/mqtt$/);
      const reg = await registerDevice(tc.api, 'ws-dev', tc.creds.enrollment_token);
      const device = await mqttConnect(tc.controller.wsUrl!, { clientId: 'ws-dev', username: 'ws-dev', password: reg.body.token });
      await device.publishAsync('kernex/devices/ws-dev/heartbeat', JSON.stringify({ status: 'online', uptime: 42 }), { qos: 1 });
      await waitFor(async () => (await tc.api.get('/devices/ws-dev')).body.uptime === 42, 'heartbeat over WebSocket');
      expect(await subscribeGranted(device, ['kernex/#'])).toEqual([128]);
      await device.endAsync(true);
      // Another path is not an MQTT endpoint.
      await expect(mqttConnect(tc.controller.wsUrl!.replace('/mqtt', '/other'), { clientId: 'x', username: 'x', password: 'x' }))
        .rejects.toThrow();
    } finally {
      await tc.stop();
    }
  });
});

describeIf('certificate rotation', () => {
  /** The files a controller was started with, and the CA that signed what they hold now. */
  async function ownFiles(from: TestCerts) {
    const dir = await mkdtemp(join(tmpdir(), 'kernex-rotate-'));
    const files = { cert: join(dir, 'server.pem'), key: join(dir, 'server.key') };
    await copyFile(from.cert, files.cert);
    await copyFile(from.key, files.key);
    return files;
  }
  const health = async (base: string, trust: string) =>
    (await undiciFetch(`${base}/api/v1/health`, { dispatcher: new Agent({ connect: { ca: trust } }) })).status;

  test('reloaded files serve new connections over HTTPS and MQTTS; a key that does not fit changes nothing', async () => {
    const [first, second] = [await makeTestCerts(), await makeTestCerts()];
    const [ca1, ca2] = [await readFile(first.ca, 'utf8'), await readFile(second.ca, 'utf8')];
    const files = await ownFiles(first);
    const fromEnv = loadControllerConfig({}, { KERNEX_TLS_CERT: files.cert, KERNEX_TLS_KEY: files.key });
    const tc = await startTestController({ tls: fromEnv.tls, mqttsPort: 0 });
    try {
      expect(await health(tc.controller.httpUrl, ca1)).toBe(200);
      const open = await mqttConnect(tc.controller.mqttsUrl!, { clientId: 'ops-before', username: 'ops', password: tc.creds.token, ca: ca1 });

      await copyFile(second.cert, files.cert);
      await copyFile(second.key, files.key);
      tc.controller.reloadTls();
      expect(await health(tc.controller.httpUrl, ca2)).toBe(200);
      await expect(health(tc.controller.httpUrl, ca1)).rejects.toThrow();
      const after = await mqttConnect(tc.controller.mqttsUrl!, { clientId: 'ops-after', username: 'ops', password: tc.creds.token, ca: ca2 });
      await after.endAsync(true);
      await expect(mqttConnect(tc.controller.mqttsUrl!, { clientId: 'ops-old', username: 'ops', password: tc.creds.token, ca: ca1 }))
        .rejects.toThrow(/certificate|self.signed|unable to verify/i);
      // A connection made before the rotation goes on.
      expect(await subscribeGranted(open, ['kernex/devices/+/status'])).toEqual([1]);
      await open.endAsync(true);

      // Half a rotation (a new key, the old certificate): refused, the working pair stays.
      await copyFile(first.key, files.key);
      expect(() => tc.controller.reloadTls()).toThrow(/key values mismatch|private key/i);
      expect(await health(tc.controller.httpUrl, ca2)).toBe(200);
      // Not PEM at all: refused with the file named.
      await writeFile(files.cert, 'not a certificate');
      expect(() => tc.controller.reloadTls()).toThrow(/KERNEX_TLS_CERT: .* is not a PEM file/);
      expect(await health(tc.controller.httpUrl, ca2)).toBe(200);
    } finally {
      await tc.stop();
    }
  });

  test('kernex server reloads them on SIGHUP', async () => {
    const [first, second] = [await makeTestCerts(), await makeTestCerts()];
    const ca2 = await readFile(second.ca, 'utf8');
    const files = await ownFiles(first);
    const server = await startControllerProcess({ env: { KERNEX_TLS_CERT: files.cert, KERNEX_TLS_KEY: files.key } });
    try {
      const base = `https://127.0.0.1:${server.httpPort}`;
      await copyFile(second.cert, files.cert);
      await copyFile(second.key, files.key);
      server.child.kill('SIGHUP');
      await waitFor(() => server.output().includes('TLS certificate reloaded'), 'the reload to be logged');
      expect(await health(base, ca2)).toBe(200);
      expect(server.child.exitCode).toBeNull();
    } finally {
      await server.kill('SIGTERM');
    }
  });
});
