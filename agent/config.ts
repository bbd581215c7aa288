// The agent's configuration: flags over KERNEX_AGENT_* / KERNEX_* variables.
import { resolve } from 'node:path';

export interface AgentConfig {
  deviceId: string;
  /** The controller's HTTP base URL (registration, downloads, HTTP fallback). */
  server: string;
  /** Overrides the MQTT URL the controller hands out at registration. */
  mqttUrl?: string;
  dataDir: string;
  enrollmentToken?: string;
  logLevel: string;
  /** Heartbeat interval in seconds until the controller configures another. */
  pollingInterval: number;
  deployTimeout: number;
  /** How many successfully deployed bundles stay on disk for rollback. */
  keepBundles: number;
  /** A CA certificate file (PEM) to trust for HTTPS and MQTT over TLS, e.g. a self-signed controller's. */
  caFile?: string;
  /** Public key files or directories: when set, only bundles signed by one of these keys are run. */
  trustedKeys: string[];
  /** Seconds a stopping agent lets a running script finish before ending it. */
  shutdownGrace: number;
}

export class AgentConfigError extends Error {}

const DEVICE_ID = /^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$/;

export const AGENT_ENV = [
  'KERNEX_DEVICE_ID', 'KERNEX_SERVER', 'KERNEX_AGENT_MQTT_URL', 'KERNEX_AGENT_DATA_DIR', 'KERNEX_ENROLLMENT_TOKEN',
  'KERNEX_LOG_LEVEL', 'KERNEX_AGENT_POLLING_INTERVAL', 'KERNEX_AGENT_DEPLOY_TIMEOUT', 'KERNEX_AGENT_KEEP_BUNDLES',
  'KERNEX_AGENT_CA_FILE', 'KERNEX_AGENT_TRUSTED_KEYS',
  'KERNEX_AGENT_SHUTDOWN_GRACE',
] as const;

function positive(name: string, raw: string | number | undefined, fallback: number): number {
  if (raw === undefined || raw === '') return fallback;
  const n = Number(raw);
  if (!Number.isInteger(n) || n < 1) throw new AgentConfigError(`${name} must be a positive integer, got '${raw}'`);
  return n;
}

export function loadAgentConfig(flags: Partial<AgentConfig> = {}, env: NodeJS.ProcessEnv = process.env): AgentConfig {
  const deviceId = flags.deviceId ?? env.KERNEX_DEVICE_ID;
  if (!deviceId) throw new AgentConfigError('a device id is required: --device-id or KERNEX_DEVICE_ID');
  if (!DEVICE_ID.test(deviceId)) {
    throw new AgentConfigError(`device id '${deviceId}' is invalid: letters, digits, '.', '_', ':' and '-' only, at most 128`);
  }
  const server = flags.server ?? env.KERNEX_SERVER ?? 'http://127.0.0.1:8000';
  try {
    const u = new URL(server);
    if (u.protocol !== 'http:' && u.protocol !== 'https:') throw new Error();
  } catch {
    throw new AgentConfigError(`--server must be an http(s) URL, got '${server}'`);
  }
  return {
    deviceId,
    server: server.replace(/\/+$/, ''),
    mqttUrl: flags.mqttUrl ?? env.KERNEX_AGENT_MQTT_URL,
    dataDir: resolve(flags.dataDir ?? env.KERNEX_AGENT_DATA_DIR ?? `.kernex-agent/${deviceId}`),
    enrollmentToken: flags.enrollmentToken ?? env.KERNEX_ENROLLMENT_TOKEN,
    logLevel: (flags.logLevel ?? env.KERNEX_LOG_LEVEL ?? 'info').toLowerCase(),
    pollingInterval: positive('polling interval', flags.pollingInterval ?? env.KERNEX_AGENT_POLLING_INTERVAL, 60),
    deployTimeout: positive('deploy timeout', flags.deployTimeout ?? env.KERNEX_AGENT_DEPLOY_TIMEOUT, 300),
    keepBundles: positive('keep bundles', flags.keepBundles ?? env.KERNEX_AGENT_KEEP_BUNDLES, 3),
    caFile: flags.caFile ?? (env.KERNEX_AGENT_CA_FILE || undefined),
    // Comma-separated in the environment; the flag may be repeated.
    trustedKeys: (flags.trustedKeys ?? (env.KERNEX_AGENT_TRUSTED_KEYS ?? '').split(','))
      .map((k) => k.trim()).filter((k) => k.length > 0).map((k) => resolve(k)),
    shutdownGrace: positive('shutdown grace', flags.shutdownGrace ?? env.KERNEX_AGENT_SHUTDOWN_GRACE, 10),
  };
}
