// A light device for fleet-sized tests: registers like the agent (Ed25519
// proof), holds an MQTT session like the agent (clean: false, QoS 1), and keeps
// the agent's promises: a command it has handled is answered from its record,
// never executed again; an outcome not yet acknowledged is sent again on every
// connect. Executing a command costs nothing: it counts, and reports success
// at once or when the test releases it.
import { mkdtemp } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import mqtt, { type MqttClient } from 'mqtt';
import { loadIdentity, registrationProof } from '../../agent/identity.js';
import type { BundleCommand, CommandResult } from '../../schemas/index.js';

export type SimMode = 'succeed' | 'hold';

export class SimDevice {
  /** Every command delivery, in order (deployment ids; duplicates included). */
  readonly received: string[] = [];
  /** Executions per deployment: must never exceed 1. */
  readonly executions = new Map<string, number>();
  /** Final results published, acknowledged or not (deployment ids). */
  readonly published: string[] = [];
  private readonly handled = new Map<string, { result: CommandResult; reported: boolean }>();
  private readonly held = new Map<string, BundleCommand>();
  private client: MqttClient | undefined;

  private constructor(readonly deviceId: string, readonly token: string, public mode: SimMode) {}

  static async register(server: string, deviceId: string, enrollmentToken: string, mode: SimMode = 'succeed'): Promise<SimDevice> {
    const identity = await loadIdentity(await mkdtemp(join(tmpdir(), `kernex-sim-${deviceId}-`)));
    const res = await fetch(`${server}/api/v1/devices/register`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({
        device_id: deviceId, public_key: identity.publicKeyPem, enrollment_token: enrollmentToken,
        ...registrationProof(identity, deviceId),
      }),
    });
    const body = (await res.json()) as { token?: string; message?: string };
    if (!body.token) throw new Error(`registration of ${deviceId} refused (${res.status}): ${body.message}`);
    return new SimDevice(deviceId, body.token, mode);
  }

  get connected(): boolean {
    return this.client?.connected ?? false;
  }

  connect(mqttUrl: string): void {
    const topic = (channel: string) => `kernex/devices/${this.deviceId}/${channel}`;
    const client = mqtt.connect(mqttUrl, {
      clientId: this.deviceId, username: this.deviceId, password: this.token, clean: false,
      reconnectPeriod: 300, connectTimeout: 5000, protocolVersion: 4,
    });
    this.client = client;
    client.on('connect', () => {
      client.subscribe([topic('commands'), topic('config')], { qos: 1 });
      for (const [id, h] of this.handled) if (!h.reported) this.publishFinal(id);
    });
    client.on('error', () => undefined);
    client.on('message', (t, payload) => {
      if (t !== topic('commands')) return;
      const command = JSON.parse(payload.toString()) as BundleCommand;
      if (command.type !== 'deploy' && command.type !== 'rollback') return;
      this.received.push(command.deployment_id);
      if (this.handled.has(command.deployment_id)) {
        this.publishFinal(command.deployment_id); // answered from the record
        return;
      }
      if (this.held.has(command.deployment_id)) return; // still running
      this.executions.set(command.deployment_id, (this.executions.get(command.deployment_id) ?? 0) + 1);
      this.publish({ deployment_id: command.deployment_id, status: 'in_progress', phase: 'running', bundle_version: command.bundle_version });
      if (this.mode === 'hold') this.held.set(command.deployment_id, command);
      else this.finish(command);
    });
  }

  /** Lets the held commands finish (even while disconnected: their outcome is sent on connect). */
  release(): void {
    for (const command of this.held.values()) this.finish(command);
    this.held.clear();
  }

  /** Whether the command for this deployment is running (held) right now. */
  holds(deploymentId: string): boolean {
    return this.held.has(deploymentId);
  }

  /** Drops the connection without a DISCONNECT, like a device losing power. */
  async drop(): Promise<void> {
    const client = this.client;
    this.client = undefined;
    if (client) await new Promise<void>((resolve) => client.end(true, {}, () => resolve()));
  }

  async stop(): Promise<void> {
    await this.drop();
  }

  private finish(command: BundleCommand): void {
    const result: CommandResult = {
      command_id: command.command_id, deployment_id: command.deployment_id, status: 'success', exit_code: 0,
      bundle_version: command.bundle_version, duration_seconds: 0.01, reported_at: new Date().toISOString(),
    };
    this.handled.set(command.deployment_id, { result, reported: false });
    this.publishFinal(command.deployment_id);
  }

  private publishFinal(deploymentId: string): void {
    const h = this.handled.get(deploymentId)!;
    this.published.push(deploymentId);
    this.publish(h.result, () => (h.reported = true));
  }

  private publish(result: CommandResult, acked?: () => void): void {
    const client = this.client;
    if (!client?.connected) return; // sent on the next connect
    client.publish(`kernex/devices/${this.deviceId}/results`, JSON.stringify(result), { qos: 1 }, (err) => {
      if (!err) acked?.();
    });
  }
}
