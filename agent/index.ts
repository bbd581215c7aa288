// The device runtime: enrollment, the MQTT connection, heartbeats, and the
// commands and configuration the controller pushes.
import { readFile } from 'node:fs/promises';
import mqtt, { type MqttClient } from 'mqtt';
import type { Logger } from 'pino';
import {
  parseJson, validate, SchemaError, type Command, type CommandResult, type ConfigureCommand, type DeviceConfigMessage, type Heartbeat,
} from '../schemas/index.js';
import type { AgentConfig } from './config.js';
import { StateFile } from './state.js';
import { loadIdentity, registrationProof } from './identity.js';
import { CommandExecutor } from './executor.js';
import { HttpFallback, HttpStatusError } from './http.js';
import { createFetch } from './fetch.js';
import { loadTrustedKeys, type TrustedKey } from './bundle/index.js';
import { pauseHook, PAUSE_ENV } from './pause.js';

import { AgentConfigError } from './config.js';
export { loadAgentConfig, AgentConfigError, AGENT_ENV, type AgentConfig } from './config.js';
export { PAUSE_ENV, PAUSE_POINTS, type PausePoint } from './pause.js';
// The bundle steps, for other device runtimes (the fleet simulator runs the same ones).
export { downloadBundle, extractBundle, runScript, BundleVerificationError } from './bundle/index.js';

export interface Agent {
  readonly deviceId: string;
  readonly state: StateFile;
  /** Resolves at the first contact with the controller: the broker, or an HTTP heartbeat while MQTT is unreachable. */
  readonly ready: Promise<void>;
  stop(): Promise<void>;
}

const topic = (deviceId: string, channel: string) => `kernex/devices/${deviceId}/${channel}`;
const LOG_LEVELS: Record<string, string> = { DEBUG: 'debug', INFO: 'info', WARNING: 'warn', ERROR: 'error' };
const MAX_BACKOFF_MS = 30_000;
/** How long an MQTT result may wait for its PUBACK before it counts as unsent (and is sent again later). */
const REPORT_TIMEOUT_MS = 15_000;
const DEFAULT_HEARTBEAT_TIMEOUT_S = 30;

function withTimeout<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} not acknowledged within ${ms} ms`)), ms);
  });
  return Promise.race([p, timeout]).finally(() => clearTimeout(timer));
}

export class EnrollmentError extends Error {}

async function enroll(config: AgentConfig, state: StateFile, logger: Logger, fetch: typeof globalThis.fetch): Promise<void> {
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

/** Reads the CA file and trusted keys named in the config; a bad path fails the start, it never turns checks off. */
async function loadTrust(config: AgentConfig): Promise<{ ca?: string; trustedKeys: TrustedKey[] }> {
  let ca: string | undefined;
  if (config.caFile) {
    try {
      ca = await readFile(config.caFile, 'utf8');
    } catch (err) {
      throw new AgentConfigError(`cannot read the CA file ${config.caFile}: ${(err as Error).message}`);
    }
    if (!ca.includes('-----BEGIN CERTIFICATE-----')) throw new AgentConfigError(`${config.caFile} holds no PEM certificate`);
  }
  let trustedKeys: TrustedKey[] = [];
  if (config.trustedKeys.length > 0) {
    try {
      trustedKeys = await loadTrustedKeys(config.trustedKeys);
    } catch (err) {
      throw new AgentConfigError(`cannot load trusted keys: ${(err as Error).message}`);
    }
  }
  return { ca, trustedKeys };
}

export async function startAgent(config: AgentConfig, logger: Logger): Promise<Agent> {
  const { ca, trustedKeys } = await loadTrust(config);
  const httpFetch = createFetch(ca);
  if (trustedKeys.length > 0) {
    logger.info({ keys: trustedKeys.map((k) => k.id) }, 'only bundles signed by a trusted key will be run');
  }
  const pause = pauseHook(process.env[PAUSE_ENV], config.dataDir, logger);
  const state = await StateFile.open(config.dataDir, config.deviceId);
  if (!state.state.token) await enroll(config, state, logger, httpFetch);
  if (state.state.log_level) logger.level = LOG_LEVELS[state.state.log_level] ?? logger.level;

  const started = Date.now();
  let client: MqttClient | undefined;
  let heartbeatTimer: NodeJS.Timeout | undefined;
  let stopped = false;
  let backoff = 1000;
  let reenrolling: Promise<void> | undefined;
  let httpBusy = false;
  let onHttp = false;
  let markReady!: () => void;
  const ready = new Promise<void>((r) => (markReady = r));

  /**
   * The controller refused this device's token (its store was reset, or the
   * device was registered again elsewhere): register again with the same key,
   * once per run, so two copies of one identity cannot take the token from
   * each other forever. A revoked device is refused and stays refused.
   */
  const reenrollOnce = (): Promise<void> => {
    if (!config.enrollmentToken || stopped) return Promise.resolve();
    // Both paths (an MQTT login refused, an HTTP 401) wait for the one attempt.
    reenrolling ??= (async () => {
      logger.warn({ deviceId: config.deviceId }, 'the controller refused this device\'s token; registering again');
      try {
        await enroll(config, state, logger, httpFetch);
        // A client still reconnecting (on a network error) must use the new token.
        if (client) client.options.password = state.state.token ?? '';
      } catch (err) {
        logger.error({ err: (err as Error).message }, 're-enrollment failed');
      }
    })();
    return reenrolling;
  };

  const interval = () => state.state.polling_interval ?? config.pollingInterval;
  const httpTimeoutMs = () => (state.state.heartbeat_timeout ?? DEFAULT_HEARTBEAT_TIMEOUT_S) * 1000;
  const mqttUp = () => client?.connected === true;
  const publish = (channel: string, payload: unknown, qos: 0 | 1) =>
    new Promise<void>((resolve, reject) => {
      if (!client) return reject(new Error('not connected'));
      client.publish(topic(config.deviceId, channel), JSON.stringify(payload), { qos }, (err) => (err ? reject(err) : resolve()));
    });
  const http = new HttpFallback({
    server: config.server, deviceId: config.deviceId, token: () => state.state.token ?? '', logger, fetchImpl: httpFetch,
  });

  // One executor whichever way a command came: its queue and its record of
  // handled commands make a command delivered twice (MQTT and HTTP) run once.
  const executor = new CommandExecutor({
    state, dataDir: config.dataDir, server: config.server, logger, keepBundles: config.keepBundles,
    trustedKeys, fetchImpl: httpFetch,
    deployTimeout: () => state.state.deploy_timeout ?? config.deployTimeout,
    report: (result: CommandResult) => mqttUp()
      ? withTimeout(publish('results', result, 1), REPORT_TIMEOUT_MS, 'result')
      : http.report(result, httpTimeoutMs()),
    pause,
  });

  const heartbeat = (): Heartbeat => ({
    status: 'online', bundle_version: state.state.current_bundle_version, config_version: state.state.config_version,
    uptime: Math.round((Date.now() - started) / 1000), sent_at: new Date().toISOString(),
  });

  const handle = (command: Command) => {
    if (command.type === 'configure') void applyConfig(command);
    else void executor.enqueue(command);
  };

  /** The HTTP fallback: a heartbeat whose answer carries the commands, then any result still unsent. */
  const httpHeartbeat = async () => {
    if (httpBusy || stopped) return;
    httpBusy = true;
    try {
      const commands = await http.heartbeat(heartbeat(), httpTimeoutMs());
      if (!onHttp) logger.info({ server: config.server }, 'MQTT unreachable: heartbeats and results go over HTTP');
      onHttp = true;
      markReady();
      for (const command of commands) handle(command);
      await executor.resendUnreported();
    } catch (err) {
      logger.warn({ err: (err as Error).message }, 'HTTP heartbeat failed');
      // The next heartbeat goes out with the fresh token.
      if (err instanceof HttpStatusError && err.status === 401) await reenrollOnce();
    } finally {
      httpBusy = false;
    }
  };

  const sendHeartbeat = () => {
    if (stopped) return;
    if (!mqttUp()) {
      void httpHeartbeat();
      return;
    }
    onHttp = false;
    void publish('heartbeat', heartbeat(), 0).catch(() => {});
  };
  const scheduleHeartbeats = () => {
    clearInterval(heartbeatTimer);
    if (!stopped) heartbeatTimer = setInterval(sendHeartbeat, interval() * 1000);
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
      if (cfg.heartbeat_timeout) s.heartbeat_timeout = cfg.heartbeat_timeout;
      if (cfg.deploy_timeout) s.deploy_timeout = cfg.deploy_timeout;
      if (cfg.log_level) s.log_level = cfg.log_level;
      if (cfg.metadata_json !== undefined) s.metadata_json = cfg.metadata_json;
    });
    if (cfg.log_level) logger.level = LOG_LEVELS[cfg.log_level] ?? logger.level;
    logger.info({ version: cfg.config_version, polling_interval: interval() }, 'configuration applied');
    scheduleHeartbeats();
    sendHeartbeat();
  };

  const mqttUrl = config.mqttUrl ?? state.state.mqtt_url ?? `mqtt://${new URL(config.server).hostname}:1883`;

  const connect = () => {
    const usedToken = state.state.token;
    let refused = false;
    const c = mqtt.connect(mqttUrl, {
      clientId: config.deviceId,
      username: config.deviceId,
      password: state.state.token ?? '',
      clean: false,
      keepalive: 30,
      reconnectPeriod: 1000,
      connectTimeout: 10_000,
      protocolVersion: 4,
      resubscribe: true,
      ...(ca ? { ca } : {}),
    });
    client = c;
    c.on('connect', () => {
      backoff = 1000;
      c.options.reconnectPeriod = backoff;
      logger.info({ mqttUrl }, 'connected');
      // Commands at QoS 1: queued in the session while offline. Config at QoS
      // 0: nothing queued, so a device coming back gets only the retained
      // (latest) configuration, never the older ones published meanwhile.
      c.subscribe(
        { [topic(config.deviceId, 'commands')]: { qos: 1 }, [topic(config.deviceId, 'config')]: { qos: 0 } },
        (err) => err && logger.warn({ err: err.message }, 'subscribe failed'),
      );
      sendHeartbeat();
      scheduleHeartbeats();
      void executor.resendUnreported();
      markReady();
    });
    c.on('close', () => {
      // Exponential backoff so a fleet does not hammer a controller that is down.
      backoff = Math.min(backoff * 2, MAX_BACKOFF_MS);
      c.options.reconnectPeriod = backoff;
    });
    c.on('error', (err: Error & { code?: number }) => {
      logger.warn({ err: err.message }, 'mqtt error');
      // Not authorized: the controller no longer knows this token.
      // mqtt.js does not reconnect after a refused login: a new client, once there is a new token.
      if ((err.code === 4 || err.code === 5) && config.enrollmentToken && !stopped && !refused) {
        refused = true;
        c.end(true, () => void reenrollOnce().then(() => {
          if (!stopped && state.state.token !== usedToken) connect();
        }));
      }
    });
    c.on('message', (t, payload) => {
      if (stopped) return; // re-sent by the controller (commands) or retained (config) for the next start
      try {
        if (t === topic(config.deviceId, 'config')) {
          void applyConfig(parseJson(validate.deviceConfig, payload, 'config'));
          return;
        }
        handle(parseJson(validate.command, payload, 'command'));
      } catch (err) {
        if (err instanceof SchemaError) logger.warn({ topic: t, err: err.message }, 'invalid message ignored');
        else throw err;
      }
    });
  };
  // A command interrupted by a kill or a stop is resumed or reported, never silently dropped.
  await executor.recover();

  connect();
  // Heartbeats start now: over MQTT once connected, over HTTP while it is not.
  scheduleHeartbeats();

  return {
    deviceId: config.deviceId,
    state,
    ready,
    async stop() {
      stopped = true;
      clearInterval(heartbeatTimer);
      await executor.stop(config.shutdownGrace * 1000);
      // A clean DISCONNECT once queued messages are out; forced if the link is down.
      await new Promise<void>((resolve) => {
        if (!client) return resolve();
        const c = client;
        const force = setTimeout(() => c.end(true, {}, () => resolve()), 2000);
        c.end(false, {}, () => {
          clearTimeout(force);
          resolve();
        });
      });
      logger.info('agent stopped');
    },
  };
}
