// `npm run demo`: a controller (child process, fresh data dir), a small
// simulated fleet, a sample bundle deployed to every device; prints what
// happens, as an integrator subscribed to kernex/events/# sees it.
import { chmod, mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as tar from 'tar';
import { Fleet, registerDevices, deviceIds } from '../sim/index.js';
import { startKernex } from './harness/children.js';
import { Api } from './harness/api.js';
import { observe } from './harness/observer.js';

const DEVICES = Number(process.env.KERNEX_DEMO_DEVICES ?? 25);
const say = (line: string) => process.stdout.write(`${line}\n`);
const started = performance.now();
const clock = () => `[${((performance.now() - started) / 1000).toFixed(2).padStart(6)} s]`;

async function sampleBundle(): Promise<Buffer> {
  const dir = await mkdtemp(join(tmpdir(), 'kernex-demo-bundle-'));
  await writeFile(join(dir, 'manifest.json'), JSON.stringify({ name: 'hello-fleet', version: '1.0.0', deploy: { script: 'deploy.sh' } }));
  await writeFile(join(dir, 'deploy.sh'), '#!/bin/sh\necho "hello-fleet $KERNEX_BUNDLE_VERSION installed"\n');
  await chmod(join(dir, 'deploy.sh'), 0o755);
  await tar.c({ gzip: true, file: join(dir, 'bundle.tar.gz'), cwd: dir, portable: true }, ['manifest.json', 'deploy.sh']);
  const bytes = await readFile(join(dir, 'bundle.tar.gz'));
  await rm(dir, { recursive: true, force: true });
  return bytes;
}

const ctl = await startKernex({ logLevel: 'info' });
let fleet: Fleet | undefined;
try {
  say(`${clock()} controller started (pid ${ctl.pid}): REST ${ctl.httpUrl}/api/v1, MQTT mqtt://${ctl.mqtt.host}:${ctl.mqtt.port}`);
  const api = new Api(ctl.httpUrl, ctl.adminToken);
  const credentials = await registerDevices({ server: ctl.httpUrl, enrollmentToken: ctl.enrollmentToken, ids: deviceIds('demo', DEVICES) });
  say(`${clock()} ${DEVICES} simulated devices registered with the enrollment token (each has its own key and device token)`);

  let finished: () => void;
  const done = new Promise<void>((r) => (finished = r));
  const events = await observe(ctl.mqtt, 'kernex/events/#', ctl.adminToken, (_topic, payload) => {
    const e = JSON.parse(payload.toString()) as Record<string, unknown>;
    if (e.type === 'deployment.created') say(`${clock()} event deployment.created: ${e.bundle_version} to ${(e.target_device_ids as string[]).length} devices`);
    else if (e.type === 'deployment.progress' && e.device_status !== 'in_progress') {
      say(`${clock()} event deployment.progress: ${e.device_id} ${e.device_status}${e.error_message ? ` (${e.error_message})` : ''}`);
    } else if (e.type === 'deployment.finished') {
      const c = e.counts as { total: number; succeeded: number; failed: number };
      say(`${clock()} event deployment.finished: ${e.status}, ${c.succeeded}/${c.total} succeeded, ${c.failed} failed`);
      finished();
    }
  });

  fleet = await Fleet.create(credentials, { server: ctl.httpUrl, runScripts: true });
  const report = await fleet.connect(ctl.mqtt);
  const c = report.connect.summary();
  say(`${clock()} ${report.connected} devices connected over MQTT (CONNECT→CONNACK p50 ${(c.p50_us / 1000).toFixed(1)} ms), heartbeating every 5 s`);
  fleet.startHeartbeats(5000);
  await new Promise((r) => setTimeout(r, 1500));
  const online = await api.onlineCount();
  say(`${clock()} the API shows ${online}/${DEVICES} devices online`);

  const bundle = await api.upload(await sampleBundle());
  say(`${clock()} bundle hello-fleet ${bundle.version} uploaded (${bundle.size} bytes, sha256 ${bundle.sha256.slice(0, 12)}…)`);
  const t0 = performance.now();
  const dep = await api.post<{ deployment_id: string }>('/deployments', { bundle_version: bundle.version, target_device_ids: credentials.map((d) => d.device_id) });
  say(`${clock()} deployment ${dep.deployment_id} created; every device downloads, verifies, extracts and runs deploy.sh`);
  await Promise.race([done, new Promise((r) => setTimeout(r, 60_000))]);
  say(`${clock()} deployed to the fleet in ${((performance.now() - t0) / 1000).toFixed(2)} s`);

  const result = await api.get<{ status: string; devices: Array<{ device_id: string; status: string; output_tail: string | null; duration_seconds: number | null }> }>(`/deployments/${dep.deployment_id}`);
  const first = result.devices[0];
  if (first) say(`${clock()} ${first.device_id} reported ${first.status} in ${first.duration_seconds} s, output: ${JSON.stringify(first.output_tail?.trim())}`);
  const devices = await api.get<Array<{ device_id: string; status: string; current_bundle_version: string | null }>>('/devices');
  const onVersion = devices.filter((d) => d.current_bundle_version === bundle.version).length;
  say(`${clock()} ${onVersion}/${devices.length} devices now run hello-fleet ${bundle.version}`);
  await events.endAsync();
} finally {
  await fleet?.end();
  await ctl.stop();
  say(`${clock()} fleet disconnected, controller stopped`);
}
