// One simulated device: a real MQTT connection with the device's own
// credentials, the agent's topics and QoS, heartbeats on demand, commands
// answered and reported like the agent (duplicates answered from the record).
import { createConnection } from 'node:net';
import { MqttClient } from 'mqtt';
import { parseJson, validate, SchemaError, type BundleCommand, type Command, type CommandResult } from '../schemas/index.js';
import { monotonicUs } from './stats.js';
import type { BundleWork } from './bundle-work.js';

export interface BrokerTarget {
  host: string;
  port: number;
}

/** What a device does with a deploy/rollback command. */
export type CommandMode =
  /** Download, verify (and optionally run) and report, as the agent does. */
  | 'execute'
  /** Only note its arrival (fan-out measurements); `settle()` reports it later. */
  | 'record';

export interface DeviceHooks {
  connected?(device: SimDevice, connectUs: number): void;
  subscribed?(device: SimDevice): void;
  closed?(device: SimDevice): void;
  command?(device: SimDevice, command: Command, atUs: number): void;
  /** A final result the broker acknowledged (for Kernex: recorded in the store). */
  result?(device: SimDevice, result: CommandResult, atUs: number): void;
  error?(device: SimDevice, err: Error): void;
}

export interface DeviceSettings {
  mode: CommandMode;
  work: BundleWork;
  hooks: DeviceHooks;
  keepaliveSeconds: number;
  reconnectMs: number;
  localAddress?: string;
}

const topic = (deviceId: string, channel: string) => `kernex/devices/${deviceId}/${channel}`;

export class SimDevice {
  client: MqttClient | undefined;
  bundleVersion: string | null = null;
  configVersion = 0;
  heartbeatSeq = 0;
  readonly startedAt = Date.now();
  /** Final outcomes by deployment id: a redelivered command is answered from here. */
  private readonly handled = new Map<string, CommandResult>();
  private readonly running = new Set<string>();
  /** Commands noted in 'record' mode and not yet reported. */
  private readonly recorded = new Map<string, BundleCommand>();
  private readonly commandsTopic: string;
  private readonly configTopic: string;

  constructor(readonly id: string, readonly token: string, private readonly settings: DeviceSettings) {
    this.commandsTopic = topic(id, 'commands');
    this.configTopic = topic(id, 'config');
  }

  get connected(): boolean {
    return this.client?.connected ?? false;
  }

  /** Opens the connection; resolves with the CONNECT→CONNACK time in µs (reconnects are automatic). */
  connect(target: BrokerTarget): Promise<number> {
    if (this.client) throw new Error(`${this.id} is already connected`);
    const { localAddress, keepaliveSeconds, reconnectMs, hooks } = this.settings;
    let started = monotonicUs();
    const client = new MqttClient(
      () => {
        started = monotonicUs();
        return createConnection({ host: target.host, port: target.port, localAddress });
      },
      {
        clientId: this.id, username: this.id, password: this.token, clean: false, protocolVersion: 4,
        keepalive: keepaliveSeconds, reconnectPeriod: reconnectMs, connectTimeout: 30_000,
        // Subscriptions are renewed on every connect (as the agent does), and
        // QoS 0 heartbeats are not queued while offline.
        resubscribe: false, queueQoSZero: false,
      },
    );
    this.client = client;
    return new Promise((resolve, reject) => {
      let first = true;
      client.on('connect', () => {
        const us = monotonicUs() - started;
        hooks.connected?.(this, us);
        client.subscribe([this.commandsTopic, this.configTopic], { qos: 1 }, (err) => {
          if (err) hooks.error?.(this, err);
          else hooks.subscribed?.(this);
        });
        if (first) {
          first = false;
          resolve(us);
        }
      });
      client.on('close', () => hooks.closed?.(this));
      client.on('error', (err) => {
        hooks.error?.(this, err);
        if (first) {
          first = false;
          client.end(true);
          reject(err);
        }
      });
      client.on('message', (t, payload) => this.onMessage(t, payload));
    });
  }

  /** Cuts the TCP connection without DISCONNECT, as a network failure would; the client reconnects. */
  drop(): void {
    this.client?.stream?.destroy();
  }

  /** DISCONNECT, then close; a connection that does not close within 2 s is cut. */
  async end(): Promise<void> {
    const client = this.client;
    this.client = undefined;
    if (!client) return;
    await new Promise<void>((resolve) => {
      const force = setTimeout(() => client.end(true, {}, () => resolve()), 2000);
      client.end(false, {}, () => {
        clearTimeout(force);
        resolve();
      });
    });
  }

  heartbeat(withSeq: boolean): number {
    const client = this.client;
    if (!client?.connected) return -1;
    const seq = ++this.heartbeatSeq;
    const payload: Record<string, unknown> = {
      status: 'online', bundle_version: this.bundleVersion, config_version: this.configVersion,
      uptime: Math.round((Date.now() - this.startedAt) / 1000), sent_at: new Date().toISOString(),
    };
    if (withSeq) payload.metrics = { sim_seq: seq };
    client.publish(topic(this.id, 'heartbeat'), JSON.stringify(payload), { qos: 0 });
    return seq;
  }

  /** Reports success for every command noted in 'record' mode (clears them on the controller). */
  settle(): Promise<void> {
    const pending = [...this.recorded.values()];
    this.recorded.clear();
    return Promise.all(pending.map((c) => this.finish(c, {
      command_id: c.command_id, deployment_id: c.deployment_id, bundle_version: c.bundle_version, status: 'success',
      duration_seconds: 0,
    }))).then(() => undefined);
  }

  private onMessage(t: string, payload: Buffer): void {
    const at = monotonicUs();
    try {
      if (t === this.configTopic) {
        const cfg = parseJson(validate.deviceConfig, payload, 'config');
        if (cfg.config_version > this.configVersion) this.configVersion = cfg.config_version;
        return;
      }
      const command = parseJson(validate.command, payload, 'command');
      this.settings.hooks.command?.(this, command, at);
      if (command.type === 'configure') {
        if (command.config_version > this.configVersion) this.configVersion = command.config_version;
        return;
      }
      this.onBundleCommand(command);
    } catch (err) {
      if (err instanceof SchemaError) this.settings.hooks.error?.(this, err);
      else throw err;
    }
  }

  private onBundleCommand(command: BundleCommand): void {
    const done = this.handled.get(command.deployment_id);
    if (done) {
      // A redelivery: answer with the recorded outcome, never execute twice.
      void this.publishResult(done).catch(() => {});
      return;
    }
    if (this.running.has(command.deployment_id) || this.recorded.has(command.deployment_id)) return;
    if (this.settings.mode === 'record') {
      this.recorded.set(command.deployment_id, command);
      return;
    }
    this.running.add(command.deployment_id);
    const progress = (phase: NonNullable<CommandResult['phase']>) => {
      void this.publishResult({
        command_id: command.command_id, deployment_id: command.deployment_id, status: 'in_progress', phase,
        bundle_version: command.bundle_version, reported_at: new Date().toISOString(),
      }).catch(() => {});
    };
    void this.settings.work.execute(this.id, this.token, command, progress).then((result) => this.finish(command, result));
  }

  private async finish(command: BundleCommand, result: CommandResult): Promise<void> {
    result.reported_at = new Date().toISOString();
    this.handled.set(command.deployment_id, result);
    this.running.delete(command.deployment_id);
    if (result.status === 'success') this.bundleVersion = command.bundle_version;
    try {
      await this.publishResult(result);
      this.settings.hooks.result?.(this, result, monotonicUs());
    } catch (err) {
      // Not acknowledged (connection lost): the controller re-sends the command
      // when the device is back, and the record answers it.
      this.settings.hooks.error?.(this, err as Error);
    }
  }

  private publishResult(result: CommandResult): Promise<void> {
    const client = this.client;
    if (!client) return Promise.reject(new Error(`${this.id} is not connected`));
    return new Promise((resolve, reject) =>
      client.publish(topic(this.id, 'results'), JSON.stringify(result), { qos: 1 }, (err) => (err ? reject(err) : resolve())));
  }
}
