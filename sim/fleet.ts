// N simulated devices in one process: connected with bounded concurrency,
// heartbeating at a steady fleet-wide rate from one timer (not N timers),
// counting what they send and receive.
import { mkdtemp } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { BundleWork } from './bundle-work.js';
import { SimDevice, type BrokerTarget, type CommandMode, type DeviceHooks } from './device.js';
import { sourceAddresses } from './addresses.js';
import { forEachLimit } from './pool.js';
import { Latency, monotonicUs } from './stats.js';
import type { DeviceCredentials } from './register.js';

export interface FleetOptions {
  /** Controller HTTP base URL (bundle downloads). */
  server: string;
  mode?: CommandMode;
  runScripts?: boolean;
  sharedDownloads?: boolean;
  downloadConcurrency?: number;
  deployTimeoutSeconds?: number;
  keepaliveSeconds?: number;
  /** Delay before a dropped connection is retried (the agent's first backoff step is 1 s). */
  reconnectMs?: number;
  /** Connections per source address before the next 127.0.0.x is used (default: 45% of the ephemeral ports). */
  perSourceAddress?: number;
  workDir?: string;
  hooks?: DeviceHooks;
}

export interface ConnectReport {
  connected: number;
  failed: number;
  elapsedMs: number;
  /** CONNECT→CONNACK per device, µs. */
  connect: Latency;
  firstError?: string;
}

export class Fleet {
  readonly devices: SimDevice[];
  readonly counters = { heartbeats: 0, commands: 0, results: 0, errors: 0, connects: 0, closes: 0 };
  private heartbeatTimer: NodeJS.Timeout | undefined;
  private readonly hooks: DeviceHooks;

  private constructor(credentials: DeviceCredentials[], opts: FleetOptions, work: BundleWork) {
    const user = opts.hooks ?? {};
    const counters = this.counters;
    // The fleet's own counters first, then the caller's hooks.
    this.hooks = {
      connected: (d, us) => { counters.connects++; user.connected?.(d, us); },
      subscribed: (d) => user.subscribed?.(d),
      closed: (d) => { counters.closes++; user.closed?.(d); },
      command: (d, c, at) => { counters.commands++; user.command?.(d, c, at); },
      result: (d, r, at) => { counters.results++; user.result?.(d, r, at); },
      error: (d, e) => { counters.errors++; user.error?.(d, e); },
    };
    const address = sourceAddresses(credentials.length, opts.perSourceAddress);
    this.devices = credentials.map((c, i) => new SimDevice(c.device_id, c.token, {
      mode: opts.mode ?? 'execute', work, hooks: this.hooks, keepaliveSeconds: opts.keepaliveSeconds ?? 60,
      reconnectMs: opts.reconnectMs ?? 1000, localAddress: address?.(i),
    }));
  }

  static async create(credentials: DeviceCredentials[], opts: FleetOptions): Promise<Fleet> {
    const work = new BundleWork({
      server: opts.server, sharedDownloads: opts.sharedDownloads ?? false, runScripts: opts.runScripts ?? false,
      workDir: opts.workDir ?? (await mkdtemp(join(tmpdir(), 'kernex-sim-'))),
      downloadConcurrency: opts.downloadConcurrency ?? 128, deployTimeoutSeconds: opts.deployTimeoutSeconds ?? 300,
    });
    return new Fleet(credentials, opts, work);
  }

  get size(): number {
    return this.devices.length;
  }

  connectedCount(): number {
    let n = 0;
    for (const d of this.devices) if (d.connected) n++;
    return n;
  }

  /**
   * Connects devices [from, to) to `target`, `concurrency` handshakes at a
   * time. A device that fails is counted, not retried here.
   */
  async connect(target: BrokerTarget, opts: { from?: number; to?: number; concurrency?: number } = {}): Promise<ConnectReport> {
    const slice = this.devices.slice(opts.from ?? 0, opts.to ?? this.devices.length);
    const report: ConnectReport = { connected: 0, failed: 0, elapsedMs: 0, connect: new Latency() };
    const started = monotonicUs();
    await forEachLimit(slice, opts.concurrency ?? 256, async (device) => {
      try {
        report.connect.record(await device.connect(target));
        report.connected++;
      } catch (err) {
        report.failed++;
        report.firstError ??= `${device.id}: ${(err as Error).message}`;
        device.client = undefined;
      }
    });
    report.elapsedMs = (monotonicUs() - started) / 1000;
    return report;
  }

  /**
   * Every connected device heartbeats once per `intervalMs`, phases spread
   * evenly: the fleet sends size/interval heartbeats per second from one
   * timer. `withSeq` adds a per-device sequence number (metrics.sim_seq).
   */
  startHeartbeats(intervalMs: number, opts: { withSeq?: boolean; onSent?: (device: SimDevice, seq: number) => void } = {}): void {
    this.stopHeartbeats();
    const tickMs = Math.max(5, Math.min(100, intervalMs / 10));
    let cursor = 0;
    let due = 0;
    let last = performance.now();
    this.heartbeatTimer = setInterval(() => {
      const now = performance.now();
      due += ((now - last) / intervalMs) * this.devices.length;
      last = now;
      while (due >= 1) {
        due--;
        const device = this.devices[cursor]!;
        cursor = (cursor + 1) % this.devices.length;
        const seq = device.heartbeat(opts.withSeq ?? false);
        if (seq > 0) {
          this.counters.heartbeats++;
          opts.onSent?.(device, seq);
        }
      }
    }, tickMs);
  }

  stopHeartbeats(): void {
    clearInterval(this.heartbeatTimer);
    this.heartbeatTimer = undefined;
  }

  /** Cuts every connection at once (no DISCONNECT); each device reconnects after `reconnectMs`. */
  dropAll(): void {
    for (const d of this.devices) d.drop();
  }

  /** Reports success for commands noted in 'record' mode. */
  async settle(): Promise<void> {
    await forEachLimit(this.devices, 512, (d) => d.settle());
  }

  /** Disconnects every device cleanly (DISCONNECT; sessions stay on the broker). */
  async end(): Promise<void> {
    this.stopHeartbeats();
    await forEachLimit(this.devices, 1024, (d) => d.end());
  }
}
