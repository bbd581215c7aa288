// The controller's configuration: KERNEX_* environment variables, overridden
// by flags, validated once at start-up with a message that says what to fix.
import { randomUUID } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { hostname } from 'node:os';
import { resolve } from 'node:path';
import { parseS3Url, type S3Config } from './blobs/index.js';
import { DEFAULT_BROKER_LIMITS, type BrokerLimits } from '../broker/index.js';

/** The S3 settings are the blob backend's own type. */
export type S3Settings = S3Config;

/** A certificate and its key, as PEM text, read at start-up. */
export interface TlsSettings {
  cert: string;
  key: string;
  /** Intermediate/CA certificates sent along with the certificate. */
  ca?: string;
  /** Where they were read from: read again on SIGHUP (certificate rotation). */
  certFile: string;
  keyFile: string;
  caFile?: string;
}

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
  /**
   * This controller's stable name among several sharing one store and one
   * Redis: it owns the presence of the devices connected to it, and resets
   * that presence when it restarts. Default `<hostname>:<mqtt port>`.
   */
  instanceId: string;
  logLevel: string;
  /** How often coalesced heartbeats are written to the store. */
  heartbeatFlushMs: number;
  /** How often deployment timeouts are enforced (one query over the states that are due). */
  sweepIntervalMs: number;
  maxBundleBytes: number;
  /** Embedded store in memory only (tests, demos). */
  inMemoryStore: boolean;
  /** Swagger UI at /api/v1/docs (the OpenAPI document at /api/v1/openapi.json is always served). */
  docsUi: boolean;
  /** HTTPS and MQTT over TLS, when a certificate and key are configured. */
  tls?: TlsSettings;
  /** The MQTT-over-TLS port (only with `tls`). */
  mqttsPort: number;
  /** Path of MQTT over WebSocket on the HTTP(S) port; null disables it. */
  mqttWsPath: string | null;
  broker: BrokerLimits;
  /** Whether registration must prove possession of the private key (secure default: required). */
  registrationProof: 'required' | 'optional';
  registrationMaxSkewSeconds: number;
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

function bool(name: string, raw: string | undefined): boolean | undefined {
  if (raw === undefined || raw === '') return undefined;
  const v = raw.toLowerCase();
  if (['1', 'true', 'yes', 'on'].includes(v)) return true;
  if (['0', 'false', 'no', 'off'].includes(v)) return false;
  throw new ConfigError(`${name} must be true or false, got '${raw}'`);
}

function url(name: string, raw: string | undefined, protocols: string[]): string | undefined {
  if (!raw) return undefined;
  let parsed: URL;
  try {
    parsed = new URL(raw);
  } catch {
    // Quoted without anything that looks like user info: these URLs carry passwords.
    throw new ConfigError(`${name} is not a valid URL: '${raw.replace(/\/\/[^@/]*@/, '//***@')}'`);
  }
  if (!protocols.includes(parsed.protocol)) {
    throw new ConfigError(`${name} must use ${protocols.join(' or ')}, got '${parsed.protocol}'`);
  }
  return raw;
}

const S3_PARTS = ['KERNEX_S3_ENDPOINT', 'KERNEX_S3_ACCESS_KEY', 'KERNEX_S3_SECRET_KEY', 'KERNEX_S3_BUCKET'] as const;
const S3_OPTIONS = ['KERNEX_S3_REGION', 'KERNEX_S3_USE_SSL'] as const;

/**
 * S3/MinIO from either one URL (KERNEX_S3_URL, see parseS3Url) or the
 * separate KERNEX_S3_* variables, never both; KERNEX_S3_PUBLIC_URL applies to
 * either. None of them set: bundles stay on the local disk.
 */
function s3FromEnv(env: NodeJS.ProcessEnv): S3Settings | undefined {
  const given = [...S3_PARTS, ...S3_OPTIONS].filter((k) => env[k]);
  const publicUrl = env.KERNEX_S3_PUBLIC_URL || undefined;
  let settings: S3Settings;
  if (env.KERNEX_S3_URL) {
    if (given.length) throw new ConfigError(`set either KERNEX_S3_URL or ${given.join(', ')}, not both`);
    try {
      settings = parseS3Url(env.KERNEX_S3_URL);
    } catch (err) {
      // parseS3Url never quotes the URL, which carries the secret key.
      throw new ConfigError(`KERNEX_S3_URL: ${(err as Error).message}`);
    }
  } else if (given.length) {
    const missing = S3_PARTS.filter((k) => !env[k]);
    if (missing.length) {
      throw new ConfigError(`S3 is partly configured (${given.join(', ')}): ${missing.join(', ')} missing`);
    }
    // Accept "host", "host:port" or "http(s)://host:port".
    const endpoint = env.KERNEX_S3_ENDPOINT!;
    const withScheme = /^https?:\/\//.test(endpoint) ? endpoint : `http://${endpoint}`;
    const u = new URL(url('KERNEX_S3_ENDPOINT', withScheme, ['http:', 'https:'])!);
    if (u.pathname !== '/' || u.search) throw new ConfigError(`KERNEX_S3_ENDPOINT must be host[:port] or http(s)://host[:port], got '${endpoint}'`);
    settings = {
      endPoint: u.hostname.replace(/^\[(.*)\]$/, '$1'),
      useSSL: bool('KERNEX_S3_USE_SSL', env.KERNEX_S3_USE_SSL) ?? u.protocol === 'https:',
      accessKey: env.KERNEX_S3_ACCESS_KEY!,
      secretKey: env.KERNEX_S3_SECRET_KEY!,
      bucket: env.KERNEX_S3_BUCKET!,
    };
    if (u.port) settings.port = Number(u.port);
    if (env.KERNEX_S3_REGION) settings.region = env.KERNEX_S3_REGION;
    if (!/^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$/.test(settings.bucket)) {
      throw new ConfigError(`KERNEX_S3_BUCKET '${settings.bucket}' is not a bucket name (3-63 lowercase letters, digits, dots, hyphens)`);
    }
  } else {
    if (publicUrl) throw new ConfigError('KERNEX_S3_PUBLIC_URL is set but S3 is not: set KERNEX_S3_URL or KERNEX_S3_ENDPOINT and its companions');
    return undefined;
  }
  if (publicUrl) {
    const u = new URL(url('KERNEX_S3_PUBLIC_URL', publicUrl, ['http:', 'https:'])!);
    // Presigned URLs sign the path: the public URL can only change the host.
    if (u.pathname !== '/' || u.search || u.hash || u.username) {
      throw new ConfigError(`KERNEX_S3_PUBLIC_URL must be http(s)://host[:port] with nothing after it, got '${publicUrl}'`);
    }
    settings.publicUrl = publicUrl;
  }
  return settings;
}

function pemFile(name: string, file: string, kind: RegExp): string {
  let text: string;
  try {
    text = readFileSync(file, 'utf8');
  } catch (err) {
    throw new ConfigError(`${name}: cannot read ${file} (${(err as NodeJS.ErrnoException).code ?? (err as Error).message})`);
  }
  if (!kind.test(text)) throw new ConfigError(`${name}: ${file} is not a PEM file of the expected kind`);
  return text;
}

/** Reads (or reads again) the certificate, key and optional CA files; throws ConfigError naming what is wrong. */
export function readTlsFiles(files: { certFile: string; keyFile: string; caFile?: string }): TlsSettings {
  const { certFile, keyFile, caFile } = files;
  return {
    cert: pemFile('KERNEX_TLS_CERT', certFile, /-----BEGIN CERTIFICATE-----/),
    key: pemFile('KERNEX_TLS_KEY', keyFile, /-----BEGIN [A-Z ]*PRIVATE KEY-----/),
    ca: caFile ? pemFile('KERNEX_TLS_CA', caFile, /-----BEGIN CERTIFICATE-----/) : undefined,
    certFile, keyFile, caFile,
  };
}

function tlsFromEnv(flags: ControllerFlags, env: NodeJS.ProcessEnv): TlsSettings | undefined {
  if (flags.tls) return flags.tls;
  const certFile = env.KERNEX_TLS_CERT;
  const keyFile = env.KERNEX_TLS_KEY;
  if (!certFile && !keyFile) return undefined;
  if (!certFile || !keyFile) throw new ConfigError('TLS needs both KERNEX_TLS_CERT and KERNEX_TLS_KEY (PEM files)');
  return readTlsFiles({ certFile, keyFile, caFile: env.KERNEX_TLS_CA || undefined });
}

function wsPath(raw: string | null | undefined): string | null {
  if (raw === undefined) return '/mqtt';
  if (raw === null || raw === '' || raw === 'off') return null;
  if (!/^\/[A-Za-z0-9._~\/-]*$/.test(raw)) throw new ConfigError(`KERNEX_MQTT_WS_PATH must be a path like /mqtt (or off), got '${raw}'`);
  return raw;
}

function brokerLimits(flags: Partial<BrokerLimits> | undefined, env: NodeJS.ProcessEnv): BrokerLimits {
  const d = DEFAULT_BROKER_LIMITS;
  const f = flags ?? {};
  return {
    maxPacketBytes: integer('KERNEX_MQTT_MAX_PACKET_BYTES', f.maxPacketBytes ?? env.KERNEX_MQTT_MAX_PACKET_BYTES,
      d.maxPacketBytes, 1024, 256 * 1024 * 1024 - 1),
    maxConnections: integer('KERNEX_MQTT_MAX_CONNECTIONS', f.maxConnections ?? env.KERNEX_MQTT_MAX_CONNECTIONS,
      d.maxConnections, 1, 10_000_000),
    maxPendingConnections: integer('KERNEX_MQTT_MAX_PENDING_CONNECTIONS',
      f.maxPendingConnections ?? env.KERNEX_MQTT_MAX_PENDING_CONNECTIONS, d.maxPendingConnections, 1, 10_000_000),
    connectTimeoutMs: integer('KERNEX_MQTT_CONNECT_TIMEOUT_MS', f.connectTimeoutMs ?? env.KERNEX_MQTT_CONNECT_TIMEOUT_MS,
      d.connectTimeoutMs, 100, 600_000),
    drainTimeoutMs: integer('KERNEX_MQTT_DRAIN_TIMEOUT_MS', f.drainTimeoutMs ?? env.KERNEX_MQTT_DRAIN_TIMEOUT_MS,
      d.drainTimeoutMs, 100, 3_600_000),
    maxOutboundBytes: integer('KERNEX_MQTT_MAX_OUTBOUND_BYTES', f.maxOutboundBytes ?? env.KERNEX_MQTT_MAX_OUTBOUND_BYTES,
      d.maxOutboundBytes, 64 * 1024, 1024 * 1024 * 1024),
  };
}

/** Every KERNEX_* variable the controller reads (the compose file test checks against it). */
export const CONTROLLER_ENV = [
  'KERNEX_DATA_DIR', 'KERNEX_HTTP_HOST', 'KERNEX_HTTP_PORT', 'KERNEX_MQTT_HOST', 'KERNEX_MQTT_PORT',
  'KERNEX_PUBLIC_URL', 'KERNEX_MQTT_PUBLIC_URL', 'KERNEX_MONGO_URL', 'KERNEX_S3_URL', ...S3_PARTS, ...S3_OPTIONS,
  'KERNEX_S3_PUBLIC_URL', 'KERNEX_REDIS_URL', 'KERNEX_INSTANCE_ID', 'KERNEX_LOG_LEVEL', 'KERNEX_HEARTBEAT_FLUSH_MS',
  'KERNEX_MAX_BUNDLE_BYTES', 'KERNEX_DOCS_UI',
  'KERNEX_TLS_CERT', 'KERNEX_TLS_KEY', 'KERNEX_TLS_CA', 'KERNEX_MQTTS_PORT', 'KERNEX_MQTT_WS_PATH',
  'KERNEX_MQTT_MAX_PACKET_BYTES', 'KERNEX_MQTT_MAX_CONNECTIONS', 'KERNEX_MQTT_MAX_PENDING_CONNECTIONS',
  'KERNEX_MQTT_CONNECT_TIMEOUT_MS', 'KERNEX_MQTT_DRAIN_TIMEOUT_MS', 'KERNEX_MQTT_MAX_OUTBOUND_BYTES',
  'KERNEX_REGISTRATION_PROOF', 'KERNEX_REGISTRATION_MAX_SKEW_SECONDS', 'KERNEX_SWEEP_INTERVAL_MS',
] as const;

export type ControllerFlags = Partial<Omit<ControllerConfig, 'broker'>> & { broker?: Partial<BrokerLimits> };

export function loadControllerConfig(flags: ControllerFlags = {}, env: NodeJS.ProcessEnv = process.env): ControllerConfig {
  const logLevel = (flags.logLevel ?? env.KERNEX_LOG_LEVEL ?? 'info').toLowerCase();
  if (!LOG_LEVELS.includes(logLevel)) {
    throw new ConfigError(`log level must be one of ${LOG_LEVELS.join(', ')}, got '${logLevel}'`);
  }
  const mqttPort = integer('MQTT port (KERNEX_MQTT_PORT)', flags.mqttPort ?? env.KERNEX_MQTT_PORT, 1883, 0, 65535);
  // With an ephemeral port the name could not be found again after a restart anyway.
  const instanceId = flags.instanceId ?? env.KERNEX_INSTANCE_ID ??
    (mqttPort === 0 ? `${hostname()}-${randomUUID().slice(0, 8)}` : `${hostname()}:${mqttPort}`);
  if (!/^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$/.test(instanceId)) {
    throw new ConfigError(`KERNEX_INSTANCE_ID '${instanceId}' is invalid: letters, digits, '.', '_', ':' and '-' only, at most 128`);
  }
  return {
    dataDir: resolve(flags.dataDir ?? env.KERNEX_DATA_DIR ?? '.kernex'),
    httpHost: host('KERNEX_HTTP_HOST', flags.httpHost ?? env.KERNEX_HTTP_HOST),
    httpPort: integer('HTTP port (KERNEX_HTTP_PORT)', flags.httpPort ?? env.KERNEX_HTTP_PORT, 8000, 0, 65535),
    mqttHost: host('KERNEX_MQTT_HOST', flags.mqttHost ?? env.KERNEX_MQTT_HOST),
    mqttPort,
    publicHttpUrl: url('KERNEX_PUBLIC_URL', flags.publicHttpUrl ?? env.KERNEX_PUBLIC_URL, ['http:', 'https:']),
    publicMqttUrl: url('KERNEX_MQTT_PUBLIC_URL', flags.publicMqttUrl ?? env.KERNEX_MQTT_PUBLIC_URL,
      ['mqtt:', 'mqtts:', 'ws:', 'wss:', 'tcp:']),
    mongoUrl: url('KERNEX_MONGO_URL', flags.mongoUrl ?? env.KERNEX_MONGO_URL, ['mongodb:', 'mongodb+srv:']),
    s3: flags.s3 ?? s3FromEnv(env),
    redisUrl: url('KERNEX_REDIS_URL', flags.redisUrl ?? env.KERNEX_REDIS_URL, ['redis:', 'rediss:']),
    instanceId,
    logLevel,
    heartbeatFlushMs: integer('KERNEX_HEARTBEAT_FLUSH_MS', flags.heartbeatFlushMs ?? env.KERNEX_HEARTBEAT_FLUSH_MS, 1000, 10, 600_000),
    sweepIntervalMs: integer('KERNEX_SWEEP_INTERVAL_MS', flags.sweepIntervalMs ?? env.KERNEX_SWEEP_INTERVAL_MS, 5000, 50, 3_600_000),
    maxBundleBytes: integer('KERNEX_MAX_BUNDLE_BYTES', flags.maxBundleBytes ?? env.KERNEX_MAX_BUNDLE_BYTES,
      512 * 1024 * 1024, 1024, Number.MAX_SAFE_INTEGER),
    inMemoryStore: flags.inMemoryStore ?? false,
    docsUi: flags.docsUi ?? bool('KERNEX_DOCS_UI', env.KERNEX_DOCS_UI) ?? true,
    tls: tlsFromEnv(flags, env),
    mqttsPort: integer('MQTT TLS port (KERNEX_MQTTS_PORT)', flags.mqttsPort ?? env.KERNEX_MQTTS_PORT, 8883, 0, 65535),
    mqttWsPath: wsPath(flags.mqttWsPath !== undefined ? flags.mqttWsPath : env.KERNEX_MQTT_WS_PATH),
    broker: brokerLimits(flags.broker, env),
    registrationProof: registrationProof(flags.registrationProof ?? env.KERNEX_REGISTRATION_PROOF),
    registrationMaxSkewSeconds: integer('KERNEX_REGISTRATION_MAX_SKEW_SECONDS',
      flags.registrationMaxSkewSeconds ?? env.KERNEX_REGISTRATION_MAX_SKEW_SECONDS, 300, 1, 86_400),
  };
}

function registrationProof(raw: string | undefined): 'required' | 'optional' {
  const value = (raw ?? 'required').toLowerCase();
  if (value !== 'required' && value !== 'optional') {
    throw new ConfigError(`KERNEX_REGISTRATION_PROOF must be 'required' or 'optional', got '${raw}'`);
  }
  return value;
}

function host(name: string, raw: string | undefined): string {
  if (raw === undefined || raw === '') return '0.0.0.0';
  if (/[\s/]/.test(raw)) throw new ConfigError(`${name} must be a host name or address to bind, got '${raw}'`);
  return raw;
}

/**
 * What a set of settings means for running several controllers, said once at
 * start-up: each is fine for one instance, and wrong for several.
 */
export function scaleOutWarnings(config: ControllerConfig): string[] {
  const warnings: string[] = [];
  if (config.redisUrl && !config.mongoUrl) {
    warnings.push('KERNEX_REDIS_URL without KERNEX_MONGO_URL: the embedded store is this instance\'s alone, so other ' +
      'instances on this Redis will not know its devices; set KERNEX_MONGO_URL to run several');
  }
  if (config.mongoUrl && !config.s3) {
    warnings.push('KERNEX_MONGO_URL without S3: bundles are kept on this instance\'s disk, where other instances ' +
      'cannot serve them; set KERNEX_S3_URL (or KERNEX_S3_ENDPOINT...) to run several');
  }
  if (config.mongoUrl && !config.redisUrl) {
    warnings.push('KERNEX_MONGO_URL without KERNEX_REDIS_URL: the broker is this instance\'s alone, so commands ' +
      'created on another instance will not reach devices connected here; set KERNEX_REDIS_URL to run several');
  }
  return warnings;
}
