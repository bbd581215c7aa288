// The device runtime: enrollment, the MQTT connection, heartbeats, and the
// commands and configuration the controller pushes.
import mqtt, { type MqttClient } from 'mqtt';
import type { Logger } from 'pino';
import { parseJson, validate, SchemaError, type CommandResult, type ConfigureCommand, type DeviceConfigMessage } from '../schemas/index.js';
import type { AgentConfig } from './config.js';
import { StateFile } from './state.js';
import { loadIdentity, registrationProof } from './identity.js';
import { CommandExecutor } from './executor.js';

export { loadAgentConfig, AgentConfigError, AGENT_ENV, type AgentConfig } from './config.js';

export interface Agent {
  readonly deviceId: string;
  readonly state: StateFile;
  /** Resolves when the agent is connected to the broker (first time). */
  readonly ready: Promise<void>;
  stop(): Promise<void>;
}

const topic = (deviceId: string, channel: string) => `kernex/devices/${deviceId}/${channel}`;
const LOG_LEVELS: Record<string, string> = { DEBUG: 'debug', INFO: 'info', WARNING: 'warn', ERROR: 'error' };
const MAX_BACKOFF_MS = 30_000;

export class EnrollmentError extends Error {}

async function enroll(config: AgentConfig, state: StateFile, logger: Logger): Promise<void> {
  if (!config.enrollmentToken) {
    throw new EnrollmentError('this device has no token yet: pass --enrollment-token (or KERNEX_ENROLLMENT_TOKEN) to register it');
  }
  const identity = await loadIdentity(config.dataDir);
  const res = await fetch(`${config.server}/api/v1/devices/register`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({
      device_id: config.deviceId, public_key: identity.publicKeyPem, enrollment_token: config.enrollmentToken,
      ...registrationProof(identity, config.deviceId),
    }),
  });
  const body = (await res.json().catch(() => ({}))) as { token?: string; mqtt_url?: string; message?: string };
  if (!res.ok || !body.token) {
    throw new EnrollmentError(`registration refused (${res.status}): ${body.message ?? 'no reason given'}`);
  }
  await state.update((s) => {
    s.token = body.token!;
    s.mqtt_url = body.mqtt_url ?? null;
  });
  logger.info({ deviceId: config.deviceId }, 'registered with the controller');
}

export async function startAgent(config: AgentConfig, logger: Logger): Promise<Agent> {
  const state = await StateFile.open(config.dataDir, config.deviceId);
  if (!state.state.token) await enroll(config, state, logger);
  if (state.state.log_level) logger.level = LOG_LEVELS[state.state.log_level] ?? logger.level;

  const started = Date.now();
  let client!: MqttClient;
  let heartbeatTimer: NodeJS.Timeout | undefined;
  let stopped = false;
  let backoff = 1000;
  let reenrolled = false;

  const interval = () => state.state.polling_interval ?? config.pollingInterval;
  const publish = (channel: string, payload: unknown, qos: 0 | 1) =>
    new Promise<void>((resolve, reject) =>
      client.publish(topic(config.deviceId, channel), JSON.stringify(payload), { qos }, (err) => (err ? reject(err) : resolve())),
    );

  const executor = new CommandExecutor({
    state, dataDir: config.dataDir, server: config.server, logger, keepBundles: config.keepBundles,
    deployTimeout: () => state.state.deploy_timeout ?? config.deployTimeout,
    report: (result: CommandResult) => publish('results', result, 1),
  });

  const sendHeartbeat = () => {
    if (!client.connected) return;
    void publish('heartbeat', {
      status: 'online', bundle_version: state.state.current_bundle_version, config_version: state.state.config_version,
      uptime: Math.round((Date.now() - started) / 1000), sent_at: new Date().toISOString(),
    }, 0).catch(() => {});
  };
  const scheduleHeartbeats = () => {
    clearInterval(heartbeatTimer);
    heartbeatTimer = setInterval(sendHeartbeat, interval() * 1000);
  };

  /** Applies a configuration newer than the one in force; older ones are ignored. */
  const applyConfig = async (cfg: DeviceConfigMessage | ConfigureCommand) => {
    if (cfg.config_version <= state.state.config_version) {
      logger.debug({ version: cfg.config_version, applied: state.state.config_version }, 'stale configuration ignored');
      return;
    }
    await state.update((s) => {
      s.config_version = cfg.config_version;
      if (cfg.polling_interval) s.polling_interval = cfg.polling_interval;
      if (cfg.deploy_timeout) s.deploy_timeout = cfg.deploy_timeout;
      if (cfg.log_level) s.log_level = cfg.log_level;
    });
    if (cfg.log_level) logger.level = LOG_LEVELS[cfg.log_level] ?? logger.level;
    logger.info({ version: cfg.config_version, polling_interval: interval() }, 'configuration applied');
    scheduleHeartbeats();
    sendHeartbeat();
  };

  const mqttUrl = config.mqttUrl ?? state.state.mqtt_url ?? `mqtt://${new URL(config.server).hostname}:1883`;
  let markReady!: () => void;
  const ready = new Promise<void>((r) => (markReady = r));

  const connect = () => {
    client = mqtt.connect(mqttUrl, {
      clientId: config.deviceId,
      username: config.deviceId,
      password: state.state.token ?? '',
      clean: false,
      keepalive: 30,
      reconnectPeriod: 1000,
      connectTimeout: 10_000,
      protocolVersion: 4,
      resubscribe: true,
    });
    client.on('connect', () => {
      backoff = 1000;
      client.options.reconnectPeriod = backoff;
      logger.info({ mqttUrl }, 'connected');
      client.subscribe(
        [topic(config.deviceId, 'commands'), topic(config.deviceId, 'config')],
        { qos: 1 },
        (err) => err && logger.warn({ err: err.message }, 'subscribe failed'),
      );
      sendHeartbeat();
      scheduleHeartbeats();
      void executor.resendUnreported();
      markReady();
    });
    client.on('close', () => {
      // Exponential backoff so a fleet does not hammer a controller that is down.
      backoff = Math.min(backoff * 2, MAX_BACKOFF_MS);
      client.options.reconnectPeriod = backoff;
    });
    client.on('error', (err: Error & { code?: number }) => {
      logger.warn({ err: err.message }, 'mqtt error');
      // Not authorized: the controller no longer knows this token; enroll again once.
      if ((err.code === 4 || err.code === 5) && !reenrolled && config.enrollmentToken && !stopped) {
        reenrolled = true;
        client.end(true, () => {
          enroll(config, state, logger).then(connect, (e: Error) => logger.error({ err: e.message }, 're-enrollment failed'));
        });
      }
    });
    client.on('message', (t, payload) => {
      try {
        if (t === topic(config.deviceId, 'config')) {
          void applyConfig(parseJson(validate.deviceConfig, payload, 'config'));
          return;
        }
        const command = parseJson(validate.command, payload, 'command');
        if (command.type === 'configure') void applyConfig(command);
        else void executor.enqueue(command);
      } catch (err) {
        if (err instanceof SchemaError) logger.warn({ topic: t, err: err.message }, 'invalid message ignored');
        else throw err;
      }
    });
  };
  // A deployment interrupted by a restart is reported, not silently dropped.
  const interrupted = state.state.in_flight;
  if (interrupted && !state.state.handled[interrupted.command.deployment_id]) {
    await state.update((s) => {
      s.handled[interrupted.command.deployment_id] = {
        result: {
          command_id: interrupted.command.command_id, deployment_id: interrupted.command.deployment_id, status: 'failed',
          bundle_version: interrupted.command.bundle_version, reason: 'interrupted',
          error_message: `the agent stopped during the ${interrupted.phase} phase`, reported_at: new Date().toISOString(),
        },
        reported: false,
        at: new Date().toISOString(),
      };
      s.in_flight = null;
    });
  }

  connect();

  return {
    deviceId: config.deviceId,
    state,
    ready,
    async stop() {
      stopped = true;
      clearInterval(heartbeatTimer);
      await executor.idle();
      await new Promise<void>((r) => client.end(false, {}, () => r()));
    },
  };
}
