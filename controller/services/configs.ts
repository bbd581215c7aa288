// Device configuration: each device's desired settings, versioned. Version 1
// is the defaults; every update adds one, atomically. A configuration is
// delivered three ways: retained on kernex/devices/{id}/config (a device that
// comes back gets the latest one only), as a configure command to a connected
// device, and in the HTTP heartbeat answer of a device whose reported
// config_version is behind.
import { randomUUID } from 'node:crypto';
import type { Logger } from 'pino';
import { validate, SchemaError, type ConfigUpdate, type ConfigureCommand, type DeviceConfigMessage } from '../../schemas/index.js';
import type { DeviceConfigDoc, Repositories } from '../model.js';
import { now, present } from '../model.js';
import type { FleetPublisher } from '../mqtt/publisher.js';
import { DuplicateKeyError } from '../store/index.js';
import { notFound } from '../errors.js';
import type { DeviceService } from './devices.js';

export const CONFIG_DEFAULTS = {
  polling_interval: 60,
  heartbeat_timeout: 30,
  deploy_timeout: 300,
  log_level: 'INFO',
  metadata_json: null,
} as const satisfies Omit<DeviceConfigDoc, '_id' | 'device_id' | 'version' | 'created_at' | 'updated_at'>;

const NUMERIC_FIELDS = ['polling_interval', 'heartbeat_timeout', 'deploy_timeout'] as const;
const METADATA_MAX_DEPTH = 8;
const METADATA_MAX_BYTES = 16 * 1024;

/**
 * metadata_json is stored as a document: keys starting with '$' or holding a
 * '.' mean something else to the store, so they are refused, as are very deep
 * or large values.
 */
function metadataProblems(value: unknown, path: string, depth: number): string[] {
  if (depth === 0 && JSON.stringify(value).length > METADATA_MAX_BYTES) {
    return [`${path} must be at most ${METADATA_MAX_BYTES} bytes of JSON`];
  }
  if (value === null || typeof value !== 'object') return [];
  if (depth >= METADATA_MAX_DEPTH) return [`${path} nests deeper than ${METADATA_MAX_DEPTH} levels`];
  const entries = Array.isArray(value) ? value.map((v, i) => [String(i), v] as const) : Object.entries(value);
  return entries.flatMap(([key, v]) => {
    const here = `${path}/${key}`;
    if (!Array.isArray(value) && (key.startsWith('$') || key.includes('.') || key === '')) {
      return [`${here}: keys may not be empty, start with '$' or contain '.'`];
    }
    return metadataProblems(v, here, depth + 1);
  });
}

export class ConfigService {
  /**
   * The highest version this process has published per device. Two updates
   * racing may finish out of order; the older one's publish is then skipped,
   * so the retained message never goes back to an older version.
   */
  private published = new Map<string, number>();

  constructor(
    private repos: Repositories,
    private publisher: FleetPublisher,
    private logger: Logger,
    /** Told each delivered polling interval, so an HTTP device polling slowly is not marked offline. */
    private devices: Pick<DeviceService, 'setPollingInterval'>,
  ) {}

  /**
   * Checks an update body. Numbers may come as numeric strings ("120"), as
   * the earlier system sent them; booleans and nulls are refused rather than
   * read as 1 or 0, and the log level is read case-insensitively.
   */
  static parseUpdate(body: unknown): ConfigUpdate {
    if (body !== null && typeof body === 'object' && !Array.isArray(body)) {
      const raw = body as Record<string, unknown>;
      const wrong = NUMERIC_FIELDS.filter((k) => k in raw && typeof raw[k] !== 'number' && typeof raw[k] !== 'string');
      if (wrong.length) {
        throw new SchemaError('config-update', wrong.map((k) => `/${k} must be a positive integer (or a numeric string)`));
      }
      if (typeof raw.log_level === 'string') raw.log_level = raw.log_level.toUpperCase();
    }
    const update = validate.configUpdate.parse(body);
    if (update.metadata_json) {
      const problems = metadataProblems(update.metadata_json, '/metadata_json', 0);
      if (problems.length) throw new SchemaError('config-update', problems.slice(0, 5));
    }
    return update;
  }

  /** A device's configuration; the first read creates (and delivers) the defaults. */
  async get(deviceId: string): Promise<DeviceConfigDoc> {
    const existing = await this.repos.deviceConfigs.findOne({ device_id: deviceId });
    if (existing) return existing;
    await this.requireDevice(deviceId);
    const { doc, created } = await this.ensure(deviceId);
    // The defaults are now this device's configuration: make it so on the device too.
    if (created) await this.deliver(doc, true);
    return doc;
  }

  /** Applies the fields given, adds one to the version, and delivers the result. */
  async update(deviceId: string, patch: ConfigUpdate): Promise<DeviceConfigDoc> {
    await this.requireDevice(deviceId);
    await this.ensure(deviceId);
    const doc = await this.repos.deviceConfigs.findOneAndUpdate(
      { device_id: deviceId },
      { $set: { ...patch, updated_at: now() }, $inc: { version: 1 } },
    );
    if (!doc) throw notFound(`configuration of device ${deviceId}`);
    this.logger.info({ deviceId, version: doc.version, fields: Object.keys(patch) }, 'device configuration updated');
    await this.deliver(doc, true);
    return doc;
  }

  /** The configure command for a device that reports an older version (or none), else null. */
  async pendingCommand(deviceId: string, reported: number | null | undefined): Promise<ConfigureCommand | null> {
    const doc = await this.repos.deviceConfigs.findOne({ device_id: deviceId });
    return doc && (reported ?? 0) < doc.version ? ConfigService.command(doc) : null;
  }

  /**
   * Adds `desired_config_version` and `config_applied` to device views (one
   * query for all of them): whether each device reports the latest version.
   */
  async annotate(views: Record<string, unknown>[]): Promise<Record<string, unknown>[]> {
    if (views.length === 0) return views;
    const ids = views.map((v) => v.device_id as string);
    const docs = await this.repos.deviceConfigs.find(ids.length === 1 ? { device_id: ids[0] } : { device_id: { $in: ids } });
    const desired = new Map(docs.map((d) => [d.device_id, d.version]));
    return views.map((v) => {
      const want = desired.get(v.device_id as string) ?? null;
      const have = typeof v.config_version === 'number' ? v.config_version : 0;
      return { ...v, desired_config_version: want, config_applied: want === null ? null : have >= want };
    });
  }

  /**
   * Publishes every stored configuration retained again. Run at start when
   * the broker keeps retained messages in memory only, so a device that was
   * offline across a controller restart still finds its latest configuration.
   */
  async republishAll(): Promise<number> {
    const docs = await this.repos.deviceConfigs.find({});
    await Promise.all(docs.map((d) => this.deliver(d, false)));
    if (docs.length) this.logger.info({ count: docs.length }, 'device configurations republished');
    return docs.length;
  }

  private async requireDevice(deviceId: string): Promise<void> {
    if ((await this.repos.devices.count({ device_id: deviceId })) === 0) throw notFound(`device ${deviceId}`);
  }

  /** Creates the defaults unless a configuration exists; safe when two requests race. */
  private async ensure(deviceId: string): Promise<{ doc: DeviceConfigDoc; created: boolean }> {
    const at = now();
    let created = false;
    try {
      const res = await this.repos.deviceConfigs.updateOne(
        { device_id: deviceId },
        { $setOnInsert: { _id: randomUUID(), ...CONFIG_DEFAULTS, version: 1, created_at: at, updated_at: at } },
        { upsert: true },
      );
      created = res.upserted;
    } catch (err) {
      // Another request created it between our find and insert.
      if (!(err instanceof DuplicateKeyError)) throw err;
    }
    const doc = await this.repos.deviceConfigs.findOne({ device_id: deviceId });
    if (!doc) throw notFound(`configuration of device ${deviceId}`);
    return { doc, created };
  }

  private async deliver(doc: DeviceConfigDoc, withCommand: boolean): Promise<void> {
    if (doc.version < (this.published.get(doc.device_id) ?? 0)) return;
    this.published.set(doc.device_id, doc.version);
    this.devices.setPollingInterval(doc.device_id, doc.polling_interval);
    try {
      await this.publisher.config(doc.device_id, ConfigService.message(doc));
      if (withCommand) await this.publisher.configure(doc.device_id, ConfigService.command(doc));
    } catch (err) {
      // Stored all the same: the device gets it from its next HTTP heartbeat, or a republish.
      this.logger.warn({ deviceId: doc.device_id, version: doc.version, err: (err as Error).message }, 'configuration not published');
    }
  }

  static view(doc: DeviceConfigDoc): Record<string, unknown> {
    return present(doc);
  }

  static message(doc: DeviceConfigDoc): DeviceConfigMessage {
    return {
      config_version: doc.version, polling_interval: doc.polling_interval, heartbeat_timeout: doc.heartbeat_timeout,
      deploy_timeout: doc.deploy_timeout, log_level: doc.log_level, metadata_json: doc.metadata_json, updated_at: doc.updated_at,
    };
  }

  static command(doc: DeviceConfigDoc): ConfigureCommand {
    return {
      type: 'configure', command_id: `config-${doc.version}`, config_version: doc.version,
      polling_interval: doc.polling_interval, heartbeat_timeout: doc.heartbeat_timeout, deploy_timeout: doc.deploy_timeout,
      log_level: doc.log_level, metadata_json: doc.metadata_json, issued_at: doc.updated_at,
    };
  }
}
