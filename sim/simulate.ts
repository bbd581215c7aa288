// `kernex simulate`: register N devices, connect them, heartbeat, answer
// commands, and log what the fleet sees until stopped.
import type { Logger } from 'pino';
import type { BrokerTarget } from './device.js';
import { Fleet } from './fleet.js';
import { registerDevices, type DeviceCredentials } from './register.js';

export interface SimulateOptions {
  server: string;
  enrollmentToken: string;
  devices: number;
  /** Device ids are `${prefix}-00001` and so on. */
  prefix: string;
  /** Seconds between one device's heartbeats; 0 for none. */
  heartbeatSeconds: number;
  /** Overrides the MQTT URL handed out at registration. */
  mqttUrl?: string;
  runScripts: boolean;
  sharedDownloads: boolean;
  registerConcurrency: number;
  connectConcurrency: number;
  logger: Logger;
}

export interface Simulation {
  fleet: Fleet;
  credentials: DeviceCredentials[];
  stop(): Promise<void>;
}

export function deviceIds(prefix: string, n: number, from = 0): string[] {
  const width = Math.max(5, String(from + n).length);
  return Array.from({ length: n }, (_, i) => `${prefix}-${String(from + i + 1).padStart(width, '0')}`);
}

export function brokerTarget(url: string): BrokerTarget {
  const u = new URL(url);
  if (u.protocol !== 'mqtt:' && u.protocol !== 'tcp:') throw new Error(`the simulator speaks plain MQTT over TCP, not ${u.protocol} (${url})`);
  return { host: u.hostname, port: Number(u.port || 1883) };
}

export async function simulate(opts: SimulateOptions): Promise<Simulation> {
  const { logger } = opts;
  const ids = deviceIds(opts.prefix, opts.devices);
  let t = Date.now();
  const credentials = await registerDevices({
    server: opts.server, enrollmentToken: opts.enrollmentToken, ids, concurrency: opts.registerConcurrency,
    onProgress: (done) => logger.debug({ done }, 'registering'),
  });
  logger.info({ devices: ids.length, seconds: (Date.now() - t) / 1000 }, 'devices registered');

  const deployments = new Map<string, { received: number; success: number; failed: number }>();
  const entry = (id: string) => {
    let e = deployments.get(id);
    if (!e) deployments.set(id, (e = { received: 0, success: 0, failed: 0 }));
    return e;
  };
  const fleet = await Fleet.create(credentials, {
    server: opts.server, runScripts: opts.runScripts, sharedDownloads: opts.sharedDownloads,
    hooks: {
      command: (_d, c) => {
        if (c.type === 'configure') return;
        const e = entry(c.deployment_id);
        if (++e.received === 1) logger.info({ deployment: c.deployment_id, type: c.type, version: c.bundle_version }, 'command arriving');
      },
      result: (d, r) => {
        const e = entry(r.deployment_id);
        if (r.status === 'success') e.success++;
        else {
          e.failed++;
          logger.warn({ device: d.id, deployment: r.deployment_id, error: r.error_message }, 'command failed');
        }
        if (e.success + e.failed === e.received) {
          logger.info({ deployment: r.deployment_id, ...e }, 'every device that received it has reported');
        }
      },
      error: (d, err) => logger.debug({ device: d.id, err: err.message }, 'device error'),
    },
  });
  const target = brokerTarget(opts.mqttUrl ?? credentials[0]!.mqtt_url);
  t = Date.now();
  const report = await fleet.connect(target, { concurrency: opts.connectConcurrency });
  const c = report.connect.summary();
  logger.info({
    connected: report.connected, failed: report.failed, seconds: (Date.now() - t) / 1000,
    connect_p50_ms: c.p50_us / 1000, connect_p99_ms: c.p99_us / 1000, firstError: report.firstError,
  }, 'devices connected');
  if (opts.heartbeatSeconds > 0) fleet.startHeartbeats(opts.heartbeatSeconds * 1000);

  const status = setInterval(() => {
    logger.info({ connected: fleet.connectedCount(), ...fleet.counters }, 'fleet');
  }, 10_000);
  return {
    fleet,
    credentials,
    async stop() {
      clearInterval(status);
      await fleet.end();
    },
  };
}
