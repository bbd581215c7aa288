// The earlier Python system's scenarios (its "Slice 3" and "Slices 4 & 5"
// completion documents, and the Slice 1-2 tests they list), run against
// Kernex's REST API the way that system's devices and tests used it: devices
// that poll POST /devices/{id}/heartbeat and report with POST
// /deployments/{id}/result. Test names are the earlier system's. Every answer
// is also checked against the schema the OpenAPI document shows for it.
import { startTestController, type ApiClient, type TestController } from './support/controller.js';
import { packBundle, scriptBundle } from './support/bundles.js';
import { expectShape } from './support/shapes.js';
import { validate } from '../schemas/index.js';
import { deviceKey, proof } from './support/devices.js';

let tc: TestController;

beforeAll(async () => {
  tc = await startTestController();
});
afterAll(async () => tc.stop());

/**
 * A device of the earlier kind: registers, polls, reports over REST. Its
 * registration also carries the proof of possession Kernex requires (a
 * signature over its id and a fresh timestamp with its private key).
 */
class PollingDevice {
  api!: ApiClient;
  readonly key = deviceKey();
  constructor(readonly id: string) {}

  async register() {
    const res = await tc.api.withToken(undefined).post('/devices/register', {
      device_id: this.id, public_key: this.key.publicKeyPem, enrollment_token: tc.creds.enrollment_token, ...proof(this.key, this.id),
    });
    if (res.status < 300) this.api = tc.api.withToken(res.body.token);
    return res;
  }

  async heartbeat(body: Record<string, unknown> = { status: 'online' }) {
    const res = await this.api.post(`/devices/${this.id}/heartbeat`, body);
    expect(res.status).toBe(200);
    return expectShape(validate.heartbeatResponse, res.body).commands;
  }

  result(deploymentId: string, body: Record<string, unknown>) {
    return this.api.post(`/deployments/${deploymentId}/result`, { device_id: this.id, ...body });
  }
}

async function device(id: string): Promise<PollingDevice> {
  const d = new PollingDevice(id);
  expect((await d.register()).status).toBe(201);
  return d;
}

async function bundle(version: string) {
  const bytes = await packBundle(scriptBundle(version, '/dev/null', { rollback: true }));
  const res = await tc.api.upload(bytes, `app-${version}.tar.gz`);
  expect(res.status).toBe(201);
  return { ...expectShape(validate.bundleView, res.body), bytes };
}

async function deploy(version: string, targets: string[]) {
  const res = await tc.api.post('/deployments', { bundle_version: version, target_device_ids: targets });
  expect(res.status).toBe(201);
  return expectShape(validate.deploymentView, res.body);
}

/** Deploys `version` to `d` and has the device run it to `status`, as the earlier runtime did. */
async function deployAndReport(d: PollingDevice, version: string, status: 'success' | 'failed', extra: Record<string, unknown> = {}) {
  const dep = await deploy(version, [d.id]);
  const commands = await d.heartbeat();
  expect(commands).toEqual([expect.objectContaining({ type: 'deploy', deployment_id: dep.deployment_id, bundle_version: version })]);
  expect((await d.result(dep.deployment_id, { status, ...extra })).status).toBe(200);
  return dep;
}

async function history(id: string) {
  const res = await tc.api.get(`/devices/${id}/bundle-history`);
  expect(res.status).toBe(200);
  return (res.body as unknown[]).map((e) => expectShape(validate.bundleHistoryEntry, e));
}

describe('Slice 1-2: registration, heartbeat, devices', () => {
  test('test_device_register', async () => {
    const d = new PollingDevice('seed-reg');
    const res = await d.register();
    expect(res.status).toBe(201);
    expect(expectShape(validate.registerResponse, res.body)).toMatchObject({ device_id: 'seed-reg', status: 'registered', created: true });
    // Idempotent for the same device and key.
    const again = await d.register();
    expect(again.status).toBe(200);
    expect(again.body).toMatchObject({ device_id: 'seed-reg', created: false });
  });

  test('test_device_register_duplicate_public_key_conflict', async () => {
    await device('seed-dup');
    const other = new PollingDevice('seed-dup');
    const res = await other.register();
    expect(res.status).toBe(409);
    expect(expectShape(validate.apiError, res.body)).toMatchObject({ error: 'conflict', message: expect.stringContaining('seed-dup') });
  });

  test('test_device_heartbeat', async () => {
    const d = await device('seed-hb');
    expect(await d.heartbeat({ status: 'online', bundle_version: null, uptime: 12 })).toEqual([]);
    expect((await tc.api.get('/devices/seed-hb')).body).toMatchObject({ status: 'online', uptime: 12 });
  });

  test('test_list_devices', async () => {
    await device('seed-list-1');
    await device('seed-list-2');
    const res = await tc.api.get('/devices');
    expect(res.status).toBe(200);
    const ids = (res.body as unknown[]).map((v) => expectShape(validate.deviceView, v).device_id);
    expect(ids).toEqual(expect.arrayContaining(['seed-list-1', 'seed-list-2']));
  });

  test('test_get_device_detail', async () => {
    await device('seed-detail');
    const res = await tc.api.get('/devices/seed-detail');
    expect(expectShape(validate.deviceView, res.body)).toMatchObject({
      device_id: 'seed-detail', status: 'offline', current_bundle_version: null, last_heartbeat: null,
    });
    expect(res.body.token_hash).toBeUndefined();
    expect(expectShape(validate.apiError, (await tc.api.get('/devices/seed-nobody')).body).error).toBe('not_found');
  });

  test('test_device_heartbeat_updates_last_heartbeat', async () => {
    const d = await device('seed-last');
    expect((await tc.api.get('/devices/seed-last')).body.last_heartbeat).toBeNull();
    await d.heartbeat();
    const first = (await tc.api.get('/devices/seed-last')).body.last_heartbeat as string;
    expect(Date.parse(first)).toBeGreaterThan(Date.now() - 60_000);
    await new Promise((r) => setTimeout(r, 5));
    await d.heartbeat();
    expect((await tc.api.get('/devices/seed-last')).body.last_heartbeat > first).toBe(true);
  });

  test('test_heartbeat_with_pending_deployment', async () => {
    const d = await device('seed-pending');
    const b = await bundle('1.1.0');
    const dep = await deploy('1.1.0', ['seed-pending']);
    expect(await d.heartbeat()).toEqual([expect.objectContaining({
      type: 'deploy', deployment_id: dep.deployment_id, bundle_id: b.id, bundle_version: '1.1.0',
    })]);
    // Still pending until the device reports: the next heartbeat carries it again.
    expect(await d.heartbeat()).toHaveLength(1);
  });
});

describe('Bundles', () => {
  test('test_upload_and_list_bundle', async () => {
    const b = await bundle('1.2.0');
    expect(b).toMatchObject({ version: '1.2.0', filename: 'app-1.2.0.tar.gz', size: b.bytes.length });
    const list = await tc.api.get('/bundles');
    const versions = (list.body as unknown[]).map((x) => expectShape(validate.bundleView, x).version);
    expect(versions).toContain('1.2.0');
  });
});

describe('Slice 3: bundle download, extraction and deployment execution', () => {
  test('test_download_bundle_endpoint_returns_file', async () => {
    const b = await bundle('3.0.0');
    const d = await device('seed-dl');
    const res = await fetch(`${tc.controller.httpUrl}/api/v1/bundles/${b.id}`, { headers: { authorization: `Bearer ${d.api.token}` } });
    expect(res.status).toBe(200);
    expect(res.headers.get('content-type')).toBe('application/octet-stream');
    expect(res.headers.get('content-disposition')).toContain('app-3.0.0.tar.gz');
    expect(Buffer.from(await res.arrayBuffer()).equals(b.bytes)).toBe(true);
  });

  test('test_deployment_with_bundle_includes_bundle_id_in_command', async () => {
    const b = await bundle('3.1.0');
    const d = await device('seed-cmd');
    await deploy('3.1.0', ['seed-cmd']);
    const [command] = await d.heartbeat();
    expect(command).toMatchObject({ type: 'deploy', bundle_id: b.id, bundle_version: '3.1.0', sha256: b.sha256, size: b.size });
    expect(command).toHaveProperty('url', `/api/v1/bundles/${b.id}`);
  });

  test('test_deployment_result_success_updates_status', async () => {
    await bundle('3.2.0');
    const d = await device('seed-ok');
    const dep = await deploy('3.2.0', ['seed-ok']);
    await d.heartbeat();
    const res = await d.result(dep.deployment_id, { status: 'success', duration_seconds: '4.2' });
    expect(expectShape(validate.resultResponse, res.body)).toEqual({
      deployment_id: dep.deployment_id, device_id: 'seed-ok', status: 'success', recorded: true,
    });
    const after = expectShape(validate.deploymentView, (await tc.api.get(`/deployments/${dep.deployment_id}`)).body);
    expect(after).toMatchObject({ status: 'success', succeeded: 1, failed: 0 });
    expect(after.devices![0]).toMatchObject({ status: 'success', duration_seconds: 4.2 });
  });

  test('test_deployment_result_failure_with_error_message', async () => {
    await bundle('3.3.0');
    const d = await device('seed-fail');
    const dep = await deploy('3.3.0', ['seed-fail']);
    await d.heartbeat();
    await d.result(dep.deployment_id, { status: 'failed', error_message: 'deploy.sh exited with 1: disk full', exit_code: 1 });
    const after = (await tc.api.get(`/deployments/${dep.deployment_id}`)).body;
    expect(after).toMatchObject({ status: 'failed', failed: 1 });
    expect(after.devices[0]).toMatchObject({ status: 'failed', error_message: 'deploy.sh exited with 1: disk full', exit_code: 1 });
    expect((await history('seed-fail'))[0]).toMatchObject({ status: 'failed', error_message: 'deploy.sh exited with 1: disk full' });
    expect((await tc.api.get('/devices/seed-fail')).body.current_bundle_version).toBeNull();
  });

  test('test_deployment_result_rejects_non_target_device', async () => {
    await bundle('3.4.0');
    await device('seed-target');
    const outsider = await device('seed-outsider');
    const dep = await deploy('3.4.0', ['seed-target']);
    const res = await outsider.result(dep.deployment_id, { status: 'success' });
    expect(res.status).toBe(403);
    expect(expectShape(validate.apiError, res.body).message).toContain('not a target');
    expect((await tc.api.get(`/deployments/${dep.deployment_id}`)).body.devices[0].status).toBe('pending');
  });

  test('test_deployment_result_invalid_status', async () => {
    await bundle('3.5.0');
    const d = await device('seed-invalid');
    const dep = await deploy('3.5.0', ['seed-invalid']);
    for (const status of ['done', 'in_progress', 'SUCCESS', '']) {
      const res = await d.result(dep.deployment_id, { status });
      expect(res.status).toBe(400);
      expect(expectShape(validate.apiError, res.body).message).toMatch(/success or failed|status/);
    }
    expect((await tc.api.get(`/deployments/${dep.deployment_id}`)).body.devices[0].status).toBe('pending');
  });
});

describe('Slice 4: rollback', () => {
  test('test_bundle_history_tracking', async () => {
    await bundle('4.0.0');
    const d = await device('seed-track');
    const dep = await deployAndReport(d, '4.0.0', 'success', { duration_seconds: 2 });
    expect(await history('seed-track')).toEqual([expect.objectContaining({
      device_id: 'seed-track', bundle_version: '4.0.0', deployment_id: dep.deployment_id, status: 'success',
      error_message: null, duration_seconds: 2, deployed_at: expect.any(String),
    })]);
  });

  test('test_rollback_to_previous_version', async () => {
    await bundle('4.1.0');
    await bundle('4.2.0');
    const d = await device('seed-rb');
    await deployAndReport(d, '4.1.0', 'success');
    await deployAndReport(d, '4.2.0', 'success');

    const res = await tc.api.post('/devices/rollback', { bundle_version: '4.1.0', target_device_ids: ['seed-rb'] });
    expect(res.status).toBe(201);
    expect(expectShape(validate.rollbackResponse, res.body)).toMatchObject({
      status: 'pending', bundle_version: '4.1.0', target_device_ids: ['seed-rb'],
    });
    const [command] = await d.heartbeat();
    expect(command).toMatchObject({ type: 'rollback', deployment_id: res.body.deployment_id, bundle_version: '4.1.0' });
    await d.result(res.body.deployment_id, { status: 'success' });

    expect((await tc.api.get('/devices/seed-rb')).body.current_bundle_version).toBe('4.1.0');
    expect((await history('seed-rb')).map((e) => [e.bundle_version, e.status])).toEqual([
      ['4.1.0', 'success'], ['4.2.0', 'rolled_back'], ['4.1.0', 'success'],
    ]);
  });

  test('test_rollback_requires_successful_history', async () => {
    await bundle('4.3.0');
    await bundle('4.4.0');
    const d = await device('seed-never');
    await deployAndReport(d, '4.3.0', 'failed', { error_message: 'boom' });
    for (const version of ['4.3.0', '4.4.0']) {
      const res = await tc.api.post('/devices/rollback', { bundle_version: version, target_device_ids: ['seed-never'] });
      expect(res.status).toBe(400);
      expect(expectShape(validate.apiError, res.body)).toMatchObject({ error: 'no_successful_deployment' });
    }
  });

  test('test_rollback_nonexistent_bundle', async () => {
    await device('seed-nobundle');
    const res = await tc.api.post('/devices/rollback', { bundle_version: '0.0.404', target_device_ids: ['seed-nobundle'] });
    expect(res).toMatchObject({ status: 400, body: { error: 'unknown_bundle', message: expect.stringContaining('0.0.404') } });
    const ghost = await tc.api.post('/devices/rollback', { bundle_version: '4.0.0', target_device_ids: ['seed-ghost'] });
    expect(ghost).toMatchObject({ status: 400, body: { error: 'unknown_device', message: expect.stringContaining('seed-ghost') } });
  });

  test('test_device_status_from_deployment_result', async () => {
    await bundle('4.5.0');
    await bundle('4.6.0');
    const d = await device('seed-status');
    await deployAndReport(d, '4.5.0', 'success');
    expect((await tc.api.get('/devices/seed-status')).body.current_bundle_version).toBe('4.5.0');
    await deployAndReport(d, '4.6.0', 'failed');
    expect((await tc.api.get('/devices/seed-status')).body.current_bundle_version).toBe('4.5.0');
  });

  test('test_bundle_history_order', async () => {
    await bundle('4.7.0');
    await bundle('4.8.0');
    await bundle('4.9.0');
    const d = await device('seed-order');
    await deployAndReport(d, '4.7.0', 'success');
    await deployAndReport(d, '4.8.0', 'success');
    await deployAndReport(d, '4.9.0', 'failed');
    const entries = await history('seed-order');
    expect(entries.map((e) => e.bundle_version)).toEqual(['4.9.0', '4.8.0', '4.7.0']);
    expect([...entries].sort((a, b) => b.deployed_at.localeCompare(a.deployed_at))).toEqual(entries);
  });
});

describe('Slice 5: device configuration', () => {
  test('test_device_config_create_and_update', async () => {
    await device('seed-cfg');
    const created = expectShape(validate.deviceConfigView, (await tc.api.get('/devices/seed-cfg/config')).body);
    expect(created).toMatchObject({ polling_interval: 60, heartbeat_timeout: 30, deploy_timeout: 300, log_level: 'INFO', version: 1 });
    // The earlier system sent numbers as strings.
    const res = await tc.api.put('/devices/seed-cfg/config', {
      polling_interval: '120', heartbeat_timeout: '45', deploy_timeout: '600', log_level: 'DEBUG', metadata_json: { custom_key: 'value' },
    });
    expect(res.status).toBe(200);
    expect(expectShape(validate.deviceConfigView, res.body)).toMatchObject({
      polling_interval: 120, heartbeat_timeout: 45, deploy_timeout: 600, log_level: 'DEBUG', metadata_json: { custom_key: 'value' }, version: 2,
    });
  });

  test('test_config_version_increment', async () => {
    await device('seed-ver');
    const versions = [(await tc.api.get('/devices/seed-ver/config')).body.version];
    for (const polling of ['30', '45', '90']) {
      versions.push((await tc.api.put('/devices/seed-ver/config', { polling_interval: polling })).body.version);
    }
    expect(versions).toEqual([1, 2, 3, 4]);
  });

  test('test_heartbeat_includes_config_command', async () => {
    await bundle('5.0.0');
    const d = await device('seed-hbcfg');
    const dep = await deploy('5.0.0', ['seed-hbcfg']);
    await tc.api.put('/devices/seed-hbcfg/config', { polling_interval: '120', heartbeat_timeout: '45', deploy_timeout: '600', log_level: 'DEBUG' });
    // As in the earlier system's example: the deploy, then the configuration.
    expect(await d.heartbeat()).toEqual([
      expect.objectContaining({ type: 'deploy', deployment_id: dep.deployment_id, bundle_version: '5.0.0' }),
      expect.objectContaining({
        type: 'configure', config_version: 2, polling_interval: 120, heartbeat_timeout: 45, deploy_timeout: 600, log_level: 'DEBUG',
      }),
    ]);
    // A device that reports the version it applied is not sent it again.
    expect((await d.heartbeat({ status: 'online', config_version: 2 })).map((c) => c.type)).toEqual(['deploy']);
  });
});
