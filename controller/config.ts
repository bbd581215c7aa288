// The controller's configuration: KERNEX_* environment variables, overridden
// by flags, validated once at start-up with a message that says what to fix.
import { resolve } from 'node:path';
import type { S3Config } from './blobs/index.js';

/** The S3 settings are the blob backend's own type. */
export type S3Settings = S3Config;

export interface ControllerConfig {
  dataDir: string;
  httpHost: string;
  httpPort: number;
  mqttHost: string;
  mqttPort: number;
  /** The HTTP base URL devices use (download links); derived from the request when unset. */
  publicHttpUrl?: string;
  /** The MQTT URL handed to devices at registration. */
  publicMqttUrl?: string;
  mongoUrl?: string;
  s3?: S3Settings;
  redisUrl?: string;
  logLevel: string;
  /** How often coalesced heartbeats are written to the store. */
  heartbeatFlushMs: number;
  maxBundleBytes: number;
  /** Embedded store in memory only (tests, demos). */
  inMemoryStore: boolean;
  /** Swagger UI at /api/v1/docs (the OpenAPI document at /api/v1/openapi.json is always served). */
  docsUi: boolean;
}

export class ConfigError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'ConfigError';
  }
}

const LOG_LEVELS = ['trace', 'debug', 'info', 'warn', 'error', 'fatal', 'silent'];

function integer(name: string, raw: string | number | undefined, fallback: number, min: number, max: number): number {
  if (raw === undefined || raw === '') return fallback;
  const n = typeof raw === 'number' ? raw : Number(raw);
  if (!Number.isInteger(n) || n < min || n > max) {
    throw new ConfigError(`${name} must be an integer between ${min} and ${max}, got '${raw}'`);
  }
  return n;
}

function bool(raw: string | undefined): boolean | undefined {
  if (raw === undefined || raw === '') return undefined;
  return ['1', 'true', 'yes', 'on'].includes(raw.toLowerCase());
}

function url(name: string, raw: string | undefined, protocols: string[]): string | undefined {
  if (!raw) return undefined;
  let parsed: URL;
  try {
    parsed = new URL(raw);
  } catch {
    throw new ConfigError(`${name} is not a valid URL: '${raw}'`);
  }
  if (!protocols.includes(parsed.protocol)) {
    throw new ConfigError(`${name} must use ${protocols.join(' or ')}, got '${parsed.protocol}'`);
  }
  return raw;
}

function s3FromEnv(env: NodeJS.ProcessEnv): S3Settings | undefined {
  const endpoint = env.KERNEX_S3_ENDPOINT;
  if (!endpoint) return undefined;
  const missing = ['KERNEX_S3_ACCESS_KEY', 'KERNEX_S3_SECRET_KEY', 'KERNEX_S3_BUCKET'].filter((k) => !env[k]);
  if (missing.length) throw new ConfigError(`KERNEX_S3_ENDPOINT is set but ${missing.join(', ')} missing`);
  // Accept "host", "host:port" or "http(s)://host:port".
  const withScheme = /^https?:\/\//.test(endpoint) ? endpoint : `http://${endpoint}`;
  const u = new URL(url('KERNEX_S3_ENDPOINT', withScheme, ['http:', 'https:'])!);
  const useSSL = bool(env.KERNEX_S3_USE_SSL) ?? u.protocol === 'https:';
  return {
    endPoint: u.hostname,
    port: u.port ? Number(u.port) : undefined,
    useSSL,
    accessKey: env.KERNEX_S3_ACCESS_KEY!,
    secretKey: env.KERNEX_S3_SECRET_KEY!,
    bucket: env.KERNEX_S3_BUCKET!,
    region: env.KERNEX_S3_REGION || undefined,
  };
}

/** Every KERNEX_* variable the controller reads (the compose file test checks against it). */
export const CONTROLLER_ENV = [
  'KERNEX_DATA_DIR', 'KERNEX_HTTP_HOST', 'KERNEX_HTTP_PORT', 'KERNEX_MQTT_HOST', 'KERNEX_MQTT_PORT',
  'KERNEX_PUBLIC_URL', 'KERNEX_MQTT_PUBLIC_URL', 'KERNEX_MONGO_URL', 'KERNEX_S3_ENDPOINT',
  'KERNEX_S3_ACCESS_KEY', 'KERNEX_S3_SECRET_KEY', 'KERNEX_S3_BUCKET', 'KERNEX_S3_REGION', 'KERNEX_S3_USE_SSL',
  'KERNEX_REDIS_URL', 'KERNEX_LOG_LEVEL', 'KERNEX_HEARTBEAT_FLUSH_MS', 'KERNEX_MAX_BUNDLE_BYTES', 'KERNEX_DOCS_UI',
] as const;

export type ControllerFlags = Partial<ControllerConfig>;

export function loadControllerConfig(flags: ControllerFlags = {}, env: NodeJS.ProcessEnv = process.env): ControllerConfig {
  const logLevel = (flags.logLevel ?? env.KERNEX_LOG_LEVEL ?? 'info').toLowerCase();
  if (!LOG_LEVELS.includes(logLevel)) {
    throw new ConfigError(`log level must be one of ${LOG_LEVELS.join(', ')}, got '${logLevel}'`);
  }
  return {
    dataDir: resolve(flags.dataDir ?? env.KERNEX_DATA_DIR ?? '.kernex'),
    httpHost: flags.httpHost ?? env.KERNEX_HTTP_HOST ?? '0.0.0.0',
    httpPort: integer('HTTP port (KERNEX_HTTP_PORT)', flags.httpPort ?? env.KERNEX_HTTP_PORT, 8000, 0, 65535),
    mqttHost: flags.mqttHost ?? env.KERNEX_MQTT_HOST ?? '0.0.0.0',
    mqttPort: integer('MQTT port (KERNEX_MQTT_PORT)', flags.mqttPort ?? env.KERNEX_MQTT_PORT, 1883, 0, 65535),
    publicHttpUrl: url('KERNEX_PUBLIC_URL', flags.publicHttpUrl ?? env.KERNEX_PUBLIC_URL, ['http:', 'https:']),
    publicMqttUrl: url('KERNEX_MQTT_PUBLIC_URL', flags.publicMqttUrl ?? env.KERNEX_MQTT_PUBLIC_URL,
      ['mqtt:', 'mqtts:', 'ws:', 'wss:', 'tcp:']),
    mongoUrl: url('KERNEX_MONGO_URL', flags.mongoUrl ?? env.KERNEX_MONGO_URL, ['mongodb:', 'mongodb+srv:']),
    s3: flags.s3 ?? s3FromEnv(env),
    redisUrl: url('KERNEX_REDIS_URL', flags.redisUrl ?? env.KERNEX_REDIS_URL, ['redis:', 'rediss:']),
    logLevel,
    heartbeatFlushMs: integer('KERNEX_HEARTBEAT_FLUSH_MS', flags.heartbeatFlushMs ?? env.KERNEX_HEARTBEAT_FLUSH_MS, 1000, 10, 600_000),
    maxBundleBytes: integer('KERNEX_MAX_BUNDLE_BYTES', flags.maxBundleBytes ?? env.KERNEX_MAX_BUNDLE_BYTES,
      512 * 1024 * 1024, 1024, Number.MAX_SAFE_INTEGER),
    inMemoryStore: flags.inMemoryStore ?? false,
    docsUi: flags.docsUi ?? bool(env.KERNEX_DOCS_UI) ?? true,
  };
}
