// A controller child with N registered simulated devices: the starting point
// of most scenarios.
import { Fleet, registerDevices, deviceIds, type DeviceCredentials, type FleetOptions } from '../../sim/index.js';
import { startKernex, type KernexChild } from './children.js';
import { Api } from './api.js';
import type { BenchContext } from '../report.js';

export interface KernexSetup {
  ctl: KernexChild;
  api: Api;
  credentials: DeviceCredentials[];
  fleet: Fleet;
  registerSeconds: number;
}

export async function kernexWithFleet(ctx: BenchContext, n: number, fleet: Omit<FleetOptions, 'server'>, opts: {
  prefix?: string; env?: Record<string, string>; extraDevices?: { prefix: string; n: number };
} = {}): Promise<KernexSetup & { extra: DeviceCredentials[] }> {
  const ctl = await startKernex({ env: opts.env });
  try {
    const api = new Api(ctl.httpUrl, ctl.adminToken);
    const started = performance.now();
    const credentials = await registerDevices({
      server: ctl.httpUrl, enrollmentToken: ctl.enrollmentToken, ids: deviceIds(opts.prefix ?? 'sim', n), concurrency: 32,
      onProgress: (done) => done % 5000 === 0 && ctx.log(`  registered ${done}/${n}`),
    });
    const extra = opts.extraDevices
      ? await registerDevices({
        server: ctl.httpUrl, enrollmentToken: ctl.enrollmentToken, ids: deviceIds(opts.extraDevices.prefix, opts.extraDevices.n), concurrency: 32,
      })
      : [];
    const registerSeconds = (performance.now() - started) / 1000;
    ctx.log(`  ${n + extra.length} devices registered in ${registerSeconds.toFixed(1)} s`);
    return { ctl, api, credentials, extra, registerSeconds, fleet: await Fleet.create(credentials, { ...fleet, server: ctl.httpUrl }) };
  } catch (err) {
    await ctl.stop();
    throw err;
  }
}

/** Waits until `check` is true, polling; false on timeout. */
export async function until(check: () => boolean | Promise<boolean>, timeoutMs: number, everyMs = 20): Promise<boolean> {
  const deadline = performance.now() + timeoutMs;
  while (performance.now() < deadline) {
    if (await check()) return true;
    await new Promise((r) => setTimeout(r, everyMs));
  }
  return check();
}
