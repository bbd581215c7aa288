// Identity and access as an admin uses them (tokens, revocation, roles), and
// the broker's limits against idle sockets, connection floods and a
// subscriber that stops reading.
import { connect as netConnect, type Socket } from 'node:net';
import type { MqttClient } from 'mqtt';
import { startTestController, waitFor, type TestController } from './support/controller.js';
import { deviceKey, registerDevice } from './support/devices.js';
import { connectPacket, mqttConnect, rawSession, subscribeGranted, subscribePacket, whenClosed } from './support/hostile.js';

describe('tokens and revocation', () => {
  let tc: TestController;
  beforeAll(async () => {
    tc = await startTestController();
  });
  afterAll(async () => tc.stop());

  test('an admin creates, lists and revokes tokens; the secret is shown once; changes are audited', async () => {
    const created = await tc.api.post('/tokens', { role: 'enrollment', name: 'batch 7', ttl_seconds: 3600 });
    expect(created.status).toBe(201);
    expect(created.body).toMatchObject({ role: 'enrollment', name: 'batch 7', active: true, token: expect.stringMatching(/^kxe_/) });
    expect(Date.parse(created.body.expires_at)).toBeGreaterThan(Date.now() + 3500_000);

    const listed = (await tc.api.get('/tokens')).body as Array<Record<string, unknown>>;
    const entry = listed.find((t) => t.id === created.body.id)!;
    expect(entry).toMatchObject({ role: 'enrollment', active: true });
    expect(entry.token).toBeUndefined();
    expect(entry.token_hash).toBeUndefined();

    // It enrolls a device, until it is revoked.
    const ok = await registerDevice(tc.api, 'batch7-a', created.body.token);
    expect(ok.status).toBe(201);
    const revoked = await tc.api.request('DELETE', `/tokens/${created.body.id}`);
    expect(revoked.body).toMatchObject({ id: created.body.id, active: false, revoked_at: expect.any(String) });
    const refused = await registerDevice(tc.api, 'batch7-b', created.body.token);
    expect(refused).toMatchObject({ status: 401, body: { error: 'enrollment_refused' } });
    // A device enrolled with it keeps working: enrollment tokens only admit new devices.
    expect((await tc.api.withToken(ok.body.token).post('/devices/batch7-a/heartbeat', {})).status).toBe(200);

    const audit = await tc.controller.services.repos.audit.find({});
    expect(audit.map((a) => a.action).sort()).toEqual(['token.create', 'token.revoke']);
    expect(audit[0]!.actor).toBe('admin:bootstrap admin');
  });

  test('the role matrix over REST', async () => {
    const s = tc.controller.services.tokens;
    const as = async (role: 'admin' | 'operator' | 'viewer' | 'integrator') => tc.api.withToken((await s.create(role, role)).token);
    const matrix: Array<[string, string, Record<string, number>]> = [
      ['GET', '/devices', { admin: 200, operator: 200, viewer: 200, integrator: 403 }],
      ['GET', '/bundles', { admin: 200, operator: 200, viewer: 200, integrator: 403 }],
      ['POST', '/deployments', { admin: 400, operator: 400, viewer: 403, integrator: 403 }],
      ['GET', '/tokens', { admin: 200, operator: 403, viewer: 403, integrator: 403 }],
      ['POST', '/tokens', { admin: 400, operator: 403, viewer: 403, integrator: 403 }],
      ['POST', '/devices/nobody/revoke', { admin: 404, operator: 404, viewer: 403, integrator: 403 }],
    ];
    for (const role of ['admin', 'operator', 'viewer', 'integrator'] as const) {
      const client = await as(role);
      for (const [method, path, expected] of matrix) {
        const res = await client.request(method, path, method === 'POST' ? {} : undefined);
        expect({ role, method, path, status: res.status }).toEqual({ role, method, path, status: expected[role] });
      }
    }
  });

  test('revoking a device: its token stops working over REST and MQTT and its connection closes at once', async () => {
    const reg = await registerDevice(tc.api, 'doomed', tc.creds.enrollment_token);
    const client = await mqttConnect(tc.controller.mqttUrl, { clientId: 'doomed', username: 'doomed', password: reg.body.token });
    // A login and a REST call first, so the credential is in both caches when it is revoked.
    await client.publishAsync('kernex/devices/doomed/heartbeat', JSON.stringify({ status: 'online' }), { qos: 1 });
    expect((await tc.api.withToken(reg.body.token).get('/devices/doomed')).status).toBe(200);
    const closed = whenClosed(client);
    const res = await tc.api.withToken((await tc.controller.services.tokens.create('operator', 'on call')).token)
      .post('/devices/doomed/revoke');
    expect(res.body).toMatchObject({ device_id: 'doomed', revoked: true, revoked_at: expect.any(String) });
    await closed;
    client.end(true);
    expect(tc.controller.broker.isDeviceConnected('doomed')).toBe(false);
    await expect(mqttConnect(tc.controller.mqttUrl, { clientId: 'doomed', username: 'doomed', password: reg.body.token }))
      .rejects.toMatchObject({ code: 4 });
    expect((await tc.api.withToken(reg.body.token).get('/devices/doomed')).status).toBe(401);
    const device = (await tc.api.get('/devices/doomed')).body;
    expect(device).toMatchObject({ status: 'offline', revoked_at: expect.any(String) });
    expect(device.token_hash).toBeUndefined();
    // Revoking twice is harmless.
    expect((await tc.api.post('/devices/doomed/revoke')).status).toBe(200);
  });

  test('registering again replaces the token: a connection made with the old one is closed, the old one refused', async () => {
    const key = deviceKey();
    const first = await registerDevice(tc.api, 'rekeyed', tc.creds.enrollment_token, key);
    const client = await mqttConnect(tc.controller.mqttUrl, { clientId: 'rekeyed', username: 'rekeyed', password: first.body.token });
    await client.publishAsync('kernex/devices/rekeyed/heartbeat', JSON.stringify({ status: 'online' }), { qos: 1 });
    const closed = whenClosed(client);
    const again = await registerDevice(tc.api, 'rekeyed', tc.creds.enrollment_token, key);
    expect(again.status).toBe(200);
    await closed;
    client.end(true);
    await expect(mqttConnect(tc.controller.mqttUrl, { clientId: 'rekeyed', username: 'rekeyed', password: first.body.token }))
      .rejects.toMatchObject({ code: 4 });
    const fresh = await mqttConnect(tc.controller.mqttUrl, { clientId: 'rekeyed', username: 'rekeyed', password: again.body.token });
    await waitFor(() => tc.controller.broker.isDeviceConnected('rekeyed'), 'the new token\'s connection');
    await fresh.endAsync();
    // Still enrolled: not revoked, just a new token.
    expect((await tc.api.get('/devices/rekeyed')).body.revoked_at ?? null).toBeNull();
  });

  test('revoking an integrator token closes its MQTT connections', async () => {
    const created = await tc.api.post('/tokens', { role: 'integrator', name: 'dashboard' });
    const client = await mqttConnect(tc.controller.mqttUrl, { clientId: 'dash-1', username: 'dash', password: created.body.token });
    expect(await subscribeGranted(client, ['kernex/devices/+/status'])).toEqual([1]);
    const closed = whenClosed(client);
    await tc.api.request('DELETE', `/tokens/${created.body.id}`);
    await closed;
    client.end(true);
    await expect(mqttConnect(tc.controller.mqttUrl, { clientId: 'dash-1', username: 'dash', password: created.body.token }))
      .rejects.toMatchObject({ code: 4 });
  });

  test('a device reconnecting takes over its own session; another credential with its client id cannot', async () => {
    const reg = await registerDevice(tc.api, 'roamer', tc.creds.enrollment_token);
    const other = await registerDevice(tc.api, 'roamer-2', tc.creds.enrollment_token);
    const first = await mqttConnect(tc.controller.mqttUrl, { clientId: 'roamer', username: 'roamer', password: reg.body.token, clean: false });
    await subscribeGranted(first, ['kernex/devices/roamer/commands']);
    await expect(mqttConnect(tc.controller.mqttUrl, { clientId: 'roamer', username: 'roamer-2', password: other.body.token }))
      .rejects.toMatchObject({ code: 4 });
    expect(first.connected).toBe(true);
    const firstClosed = whenClosed(first);
    const second = await mqttConnect(tc.controller.mqttUrl, { clientId: 'roamer', username: 'roamer', password: reg.body.token, clean: false });
    await firstClosed;
    first.end(true);
    // The session (its subscription) carried over to the new connection.
    const got = new Promise<string>((r) => second.once('message', (_t, p) => r(p.toString())));
    await tc.controller.broker.publish('kernex/devices/roamer/commands', { type: 'configure', command_id: 'c1', config_version: 1 });
    expect(JSON.parse(await got)).toMatchObject({ command_id: 'c1' });
    await waitFor(async () => (await tc.api.get('/devices/roamer')).body.status === 'online', 'roamer online');
    await second.endAsync(true);
  });

  test('registration proofs: the same key re-registers with a fresh proof, and only a fresh one', async () => {
    const key = deviceKey();
    expect((await registerDevice(tc.api, 'prover', tc.creds.enrollment_token, key)).status).toBe(201);
    expect((await registerDevice(tc.api, 'prover', tc.creds.enrollment_token, key)).status).toBe(200);
    const stored = await tc.controller.services.repos.devices.findOne({ device_id: 'prover' });
    expect(Date.parse(stored!.proof_at!)).toBeGreaterThan(Date.now() - 10_000);
  });
});

describe('registration proof policy', () => {
  test('KERNEX_REGISTRATION_PROOF=optional admits a legacy device without proof, but never a bad one', async () => {
    const tc = await startTestController({ registrationProof: 'optional' });
    try {
      const key = deviceKey();
      const legacy = await tc.api.withToken(undefined).post('/devices/register', {
        device_id: 'legacy', public_key: key.publicKeyPem, enrollment_token: tc.creds.enrollment_token,
      });
      expect(legacy.status).toBe(201);
      const forged = await tc.api.withToken(undefined).post('/devices/register', {
        device_id: 'legacy-2', public_key: key.publicKeyPem, enrollment_token: tc.creds.enrollment_token,
        timestamp: new Date().toISOString(), signature: Buffer.alloc(64).toString('base64'),
      });
      expect(forged).toMatchObject({ status: 401, body: { error: 'invalid_proof' } });
    } finally {
      await tc.stop();
    }
  });
});

describe('broker limits', () => {
  let tc: TestController;
  let token: string;
  beforeAll(async () => {
    tc = await startTestController({
      broker: { maxConnections: 60, maxPendingConnections: 20, connectTimeoutMs: 1000, maxPacketBytes: 2 * 1024 * 1024,
        maxOutboundBytes: 2 * 1024 * 1024 },
    });
    token = (await registerDevice(tc.api, 'real', tc.creds.enrollment_token)).body.token;
  });
  afterAll(async () => tc.stop());

  const openIdle = (n: number) => Promise.all(Array.from({ length: n }, () => new Promise<Socket>((resolve) => {
    const s = netConnect(tc.controller.mqttPort, '127.0.0.1');
    s.on('error', () => {});
    s.once('connect', () => resolve(s));
  })));
  const closedCount = (sockets: Socket[]) => sockets.filter((s) => s.destroyed || s.readableEnded).length;

  test('a flood of idle sockets cannot keep a real device out', async () => {
    const idle = await openIdle(50);
    await waitFor(() => tc.controller.broker.connectionStats().pending <= 20, 'idle sockets beyond the pending cap to be evicted');
    const real = await mqttConnect(tc.controller.mqttUrl, { clientId: 'real', username: 'real', password: token });
    await real.publishAsync('kernex/devices/real/heartbeat', JSON.stringify({ status: 'online', uptime: 1 }), { qos: 1 });
    expect(real.connected).toBe(true);
    // The connect timeout ends the rest.
    await waitFor(() => closedCount(idle) === 50, 'every idle socket to be closed', 10_000);
    const stats = tc.controller.broker.connectionStats();
    process.stderr.write(`idle flood: ${stats.evicted} evicted, ${50 - stats.evicted} timed out; pending now ${stats.pending}\n`);
    expect(stats.evicted).toBeGreaterThanOrEqual(30);
    expect(stats.pending).toBe(0);
    await real.endAsync(true);
  });

  test('connections beyond the cap are refused at once; the ones inside keep working', async () => {
    const real = await mqttConnect(tc.controller.mqttUrl, { clientId: 'real', username: 'real', password: token });
    const refusedBefore = tc.controller.broker.connectionStats().refused;
    // 59 more fill the cap of 60; they are sent CONNECT-less but the pending cap evicts only beyond 20,
    // so open them in batches that each complete CONNECT as integrators.
    const integrator = (await tc.controller.services.tokens.create('integrator', 'fill')).token;
    const fillers: MqttClient[] = [];
    for (let i = 0; i < 59; i++) fillers.push(await mqttConnect(tc.controller.mqttUrl, { clientId: `fill-${i}`, username: 'f', password: integrator }));
    expect(tc.controller.broker.connectionStats().open).toBe(60);
    const extra = await openIdle(3);
    await waitFor(() => closedCount(extra) === 3, 'connections over the cap to be closed');
    expect(tc.controller.broker.connectionStats().refused).toBe(refusedBefore + 3);
    await real.publishAsync('kernex/devices/real/heartbeat', JSON.stringify({ status: 'online', uptime: 2 }), { qos: 1 });
    await Promise.all(fillers.map((f) => f.endAsync(true)));
    await real.endAsync(true);
  });

  test('a subscriber that stops reading is dropped; delivery to others goes on', async () => {
    const integrator = (await tc.controller.services.tokens.create('integrator', 'slow')).token;
    const fast = await mqttConnect(tc.controller.mqttUrl, { clientId: 'fast', username: 'f', password: integrator });
    await subscribeGranted(fast, ['kernex/devices/+/status']);
    // The slow one: a raw socket that subscribes, then never reads again.
    const slow = await rawSession(tc.controller.mqttPort);
    slow.socket.write(connectPacket('slow', 's', integrator));
    slow.socket.write(subscribePacket(1, 'kernex/devices/+/status'));
    await waitFor(() => slow.received().length >= 4 + 5, 'CONNACK and SUBACK');
    slow.socket.pause();
    let received = 0;
    // Only this test's messages: the controller may also publish the status of
    // a device an earlier test disconnected (written, then said, at its next flush).
    fast.on('message', (_t, p) => {
      if (p.length > 8 * 1024) received++;
    });
    const payload = { device_id: 'real', status: 'online', last_heartbeat: null, bundle_version: null, config_version: null,
      changed_at: new Date().toISOString(), padding: 'p'.repeat(8 * 1024) };
    // Batches of 512 KiB, each delivered to the reader before the next: a live fleet, not one burst.
    const batch = 64;
    let sent = 0;
    const started = Date.now();
    while (tc.controller.broker.aedes.clients.slow && sent < 200 * batch) {
      await Promise.all(Array.from({ length: batch }, () => tc.controller.broker.publish('kernex/devices/real/status', payload, { qos: 0 })));
      sent += batch;
      await waitFor(() => received === sent, 'the batch to reach the reading subscriber', 10_000, 5);
    }
    const elapsed = Date.now() - started;
    expect(tc.controller.broker.aedes.clients.slow).toBeUndefined();
    expect(tc.controller.broker.connectionStats().slow).toBe(1);
    expect(received).toBe(sent);
    expect(fast.connected).toBe(true);
    process.stderr.write(`slow subscriber dropped after ${(sent * 8) / 1024} MiB; the reading one got all ${sent} messages ` +
      `in ${elapsed} ms\n`);
    slow.socket.destroy();
    await fast.endAsync(true);
  });
});
