// The earlier system's devices: no held connection, a POST
// /devices/{id}/heartbeat every polling interval, whose answer lists the
// commands waiting for the device; outcomes go back over REST
// (POST /deployments/{id}/result). Kept to measure what push replaces.
import { parseJson, validate, type BundleCommand } from '../schemas/index.js';
import type { BundleWork } from './bundle-work.js';
import type { DeviceCredentials } from './register.js';
import { monotonicUs } from './stats.js';

export interface PollerHooks {
  /** A command first seen in a poll answer. */
  command?(deviceId: string, command: BundleCommand, atUs: number): void;
  /** The controller accepted the outcome. */
  result?(deviceId: string, status: string, atUs: number): void;
  error?(deviceId: string, err: Error): void;
}

export interface PollingFleetOptions {
  server: string;
  intervalMs: number;
  work: BundleWork;
  hooks?: PollerHooks;
}

export class PollingFleet {
  readonly counters = { polls: 0, commands: 0, results: 0, errors: 0 };
  private timers: NodeJS.Timeout[] = [];
  private readonly handled = new Set<string>();

  constructor(private readonly devices: DeviceCredentials[], private readonly opts: PollingFleetOptions) {}

  /** Each device polls every interval, starting at a random phase, as an unsynchronised fleet does. */
  start(): void {
    for (const d of this.devices) {
      const first = setTimeout(() => {
        void this.poll(d);
        this.timers.push(setInterval(() => void this.poll(d), this.opts.intervalMs));
      }, Math.random() * this.opts.intervalMs);
      this.timers.push(first);
    }
  }

  stop(): void {
    for (const t of this.timers) clearTimeout(t);
    this.timers = [];
  }

  private async poll(d: DeviceCredentials): Promise<void> {
    const hooks = this.opts.hooks ?? {};
    try {
      this.counters.polls++;
      const res = await fetch(`${this.opts.server}/api/v1/devices/${d.device_id}/heartbeat`, {
        method: 'POST',
        headers: { authorization: `Bearer ${d.token}`, 'content-type': 'application/json' },
        body: JSON.stringify({ status: 'online', sent_at: new Date().toISOString() }),
      });
      if (!res.ok) throw new Error(`heartbeat refused: HTTP ${res.status}`);
      const body = (await res.json()) as { commands?: unknown[] };
      for (const raw of body.commands ?? []) {
        const command = parseJson(validate.command, Buffer.from(JSON.stringify(raw)), 'command');
        if (command.type === 'configure') continue;
        const key = `${d.device_id}:${command.deployment_id}`;
        if (this.handled.has(key)) continue;
        this.handled.add(key);
        this.counters.commands++;
        hooks.command?.(d.device_id, command, monotonicUs());
        void this.execute(d, command);
      }
    } catch (err) {
      this.counters.errors++;
      hooks.error?.(d.device_id, err as Error);
    }
  }

  private async execute(d: DeviceCredentials, command: BundleCommand): Promise<void> {
    const result = await this.opts.work.execute(d.device_id, d.token, command, () => {});
    const res = await fetch(`${this.opts.server}/api/v1/deployments/${command.deployment_id}/result`, {
      method: 'POST',
      headers: { authorization: `Bearer ${d.token}`, 'content-type': 'application/json' },
      body: JSON.stringify({
        device_id: d.device_id, status: result.status, error_message: result.error_message ?? null,
        duration_seconds: result.duration_seconds, bundle_version: command.bundle_version,
      }),
    }).catch((err: Error) => err);
    if (res instanceof Error || !res.ok) {
      this.counters.errors++;
      this.opts.hooks?.error?.(d.device_id, res instanceof Error ? res : new Error(`result refused: HTTP ${res.status}`));
      return;
    }
    await res.body?.cancel();
    this.counters.results++;
    this.opts.hooks?.result?.(d.device_id, result.status, monotonicUs());
  }
}
