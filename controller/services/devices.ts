// Devices: registration, credentials, presence and heartbeats. Heartbeats are
// the hot path: the latest one per device lives in memory and is written to
// the store in batches, never one synchronous write per heartbeat.
//
// Presence with several controllers: each MQTT connection claims the device
// with one store write that increments `mqtt_generation` and names this
// instance in `mqtt_instance`. Everything that connection later writes
// (heartbeats, the final "offline") is conditional on that generation, so an
// instance that learns late that a device left it (the device has already
// connected to another instance) can no longer overwrite the newer state.
import { randomUUID, timingSafeEqual } from 'node:crypto';
import { LRUCache } from 'lru-cache';
import type { Logger } from 'pino';
import type { Heartbeat, RegisterRequest } from '../../schemas/index.js';
import type { DeviceDoc, DeviceStatus, Repositories } from '../model.js';
import { now, present } from '../model.js';
import type { FleetPublisher } from '../mqtt/publisher.js';
import type { TokenService } from './tokens.js';
import { hashToken, newToken } from './tokens.js';
import { ApiError, conflict, forbidden, notFound } from '../errors.js';
import { DuplicateKeyError, type BulkUpdate } from '../store/index.js';
import { parsePublicKey, verifyRegistrationProof, type ProofOptions } from './registration-proof.js';

interface LiveState {
  status: DeviceStatus;
  connection: 'mqtt' | 'http';
  /** For MQTT: the connection generation this state belongs to. */
  generation?: number;
  last_heartbeat: string | null;
  bundle_version?: string | null;
  config_version?: number | null;
  uptime?: number;
  metrics?: Record<string, unknown>;
}

export interface DeviceServiceOptions {
  flushMs: number;
  /** This controller's stable name; it owns the presence of the devices connected to it. */
  instanceId: string;
  /** Seconds without a heartbeat after which an HTTP-polling device is offline. */
  httpOfflineAfterSeconds?: number;
  /** Registration proof of possession; required unless configured otherwise. */
  proof?: ProofOptions;
  /** Device credentials kept in memory (MQTT logins are frequent); least recently used go first. */
  credentialCacheSize?: number;
}

const DEVICE_ID = /^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$/;

/** One MQTT connection of a device to this instance. */
interface Session {
  /** Resolves to the generation the connection claimed (null: the device is gone from the store). */
  claim: Promise<number | null>;
  generation?: number;
}

const equalHashes = (a: string, b: string) => a.length === b.length && timingSafeEqual(Buffer.from(a), Buffer.from(b));

/** Public keys compared as keys, not as PEM text (line breaks, older documents). */
function samePublicKey(stored: string, normalized: string): boolean {
  if (stored === normalized) return true;
  try {
    return parsePublicKey(stored).normalized === normalized;
  } catch {
    return false;
  }
}

export class DeviceService {
  /** Heartbeats (and HTTP presence) not yet written to the store. */
  private pending = new Map<string, { state: LiveState; session?: Session }>();
  /** The newest known live state per device (also what is already flushed). */
  private live = new Map<string, LiveState>();
  private pollingIntervals = new Map<string, number>();
  /**
   * Token hash per device id, '' for an id that is unknown or revoked. Keyed by
   * what a client sends as its MQTT username, so bounded: a flood of made-up
   * names evicts entries, it cannot grow the map.
   */
  private tokenHashes: LRUCache<string, string>;
  /** Token hash → device id, for bearer tokens on REST (HTTP-polling devices authenticate on every request). */
  private deviceByTokenHash: LRUCache<string, string>;
  /** MQTT connections held by this instance: the generation each claimed (a promise until the store answered). */
  private sessions = new Map<string, Session>();
  /** Connections that ended: their "offline" is written, conditionally, at the next flush. */
  private ended = new Map<string, Session>();
  private timers: NodeJS.Timeout[] = [];
  private flushing: Promise<void> = Promise.resolve();
  /** Heartbeats accepted since start, and writes that carried them (batches). */
  readonly counters = { heartbeats: 0, flushes: 0, flushedDevices: 0, staleOffline: 0 };

  constructor(
    private repos: Repositories,
    private tokens: TokenService,
    private publisher: FleetPublisher,
    private logger: Logger,
    private options: DeviceServiceOptions,
  ) {
    // Unknown names are cached briefly only, so a device registered on another
    // controller instance can log in here soon after.
    this.tokenHashes = new LRUCache({ max: options.credentialCacheSize ?? 50_000, ttl: 10 * 60_000 });
    this.deviceByTokenHash = new LRUCache({ max: options.credentialCacheSize ?? 50_000, ttl: 10 * 60_000 });
  }

  /**
   * `presence`: 'all' when this process is the only broker (no MQTT
   * connection survives its restart); 'own' when it shares a Redis-backed
   * broker with others: only the devices this instance held are reset, since
   * those connected elsewhere are still online.
   */
  async start(presence: 'all' | 'own'): Promise<void> {
    const filter: Record<string, unknown> = { connection: 'mqtt', status: { $ne: 'offline' } };
    if (presence === 'own') filter.mqtt_instance = this.options.instanceId;
    await this.repos.devices.updateMany(filter, { $set: { status: 'offline', updated_at: now() } });
    this.timers.push(setInterval(() => void this.flush(), this.options.flushMs).unref());
    this.timers.push(setInterval(() => void this.sweep(), 5_000).unref());
  }

  async stop(): Promise<void> {
    for (const t of this.timers) clearInterval(t);
    this.timers = [];
    await this.flush();
  }

  async register(req: RegisterRequest): Promise<{ created: boolean; device: DeviceDoc; token: string }> {
    const enrollment = req.enrollment_token ? await this.tokens.lookup(req.enrollment_token, ['enrollment']) : null;
    if (!enrollment) {
      throw new ApiError(401, 'enrollment_refused',
        'a valid enrollment_token is required to register; ask an admin for one (POST /api/v1/tokens with role "enrollment")');
    }
    const { key, normalized } = parsePublicKey(req.public_key);
    const proofOptions = this.options.proof ?? { policy: 'required', maxSkewSeconds: 300 };
    const token = newToken('kxd');
    const existing = await this.repos.devices.findOne({ device_id: req.device_id });
    if (existing) {
      if (existing.revoked_at) throw forbidden(`device ${req.device_id} has been revoked`);
      if (!samePublicKey(existing.public_key, normalized)) {
        throw conflict(`device ${req.device_id} is already registered with a different public key`);
      }
      const proofAt = verifyRegistrationProof(req, key, existing.proof_at ?? null, proofOptions);
      // Conditional on the token seen, so two replays of one request racing cannot both win.
      const res = await this.repos.devices.updateOne(
        { _id: existing._id, revoked_at: null, token_hash: existing.token_hash },
        { $set: { token_hash: hashToken(token), proof_at: proofAt ?? existing.proof_at ?? null, updated_at: now() } },
      );
      if (res.matched === 0) throw conflict(`device ${req.device_id} changed during registration; retry`);
      this.forget(req.device_id);
      return { created: false, device: { ...existing, token_hash: hashToken(token) }, token };
    }
    const proofAt = verifyRegistrationProof(req, key, null, proofOptions);
    const at = now();
    const device: DeviceDoc = {
      _id: randomUUID(), device_id: req.device_id, public_key: normalized, token_hash: hashToken(token),
      status: 'offline', connection: null, mqtt_instance: null, mqtt_generation: 0,
      last_heartbeat: null, current_bundle_version: null, config_version: null,
      uptime: null, metrics: null, hardware_id: req.hardware_id ?? null, metadata: (req.metadata as Record<string, unknown>) ?? null,
      revoked_at: null, proof_at: proofAt, created_at: at, updated_at: at,
    };
    try {
      await this.repos.devices.insertOne(device);
    } catch (err) {
      // Two registrations of the same id raced: the loser is told as if it came second.
      if (err instanceof DuplicateKeyError) throw conflict(`device ${req.device_id} is already registered`);
      throw err;
    }
    this.tokenHashes.delete(req.device_id);
    // Debug, not info: enrolling a fleet registers thousands at once.
    this.logger.debug({ deviceId: req.device_id, enrollment: enrollment.name }, 'device registered');
    return { created: true, device, token };
  }

  /**
   * Revokes a device: its token stops working over REST and MQTT, it may not
   * register again, and (through `onRevoked`) its MQTT connection is closed.
   * Returns false when the device was already revoked.
   */
  async revoke(deviceId: string): Promise<boolean> {
    const at = now();
    const res = await this.repos.devices.updateOne(
      { device_id: deviceId, revoked_at: null },
      { $set: { revoked_at: at, token_hash: null, status: 'offline', updated_at: at } },
    );
    this.forget(deviceId);
    if (res.matched === 0) {
      if (!(await this.exists(deviceId))) throw notFound(`device ${deviceId}`);
      return false;
    }
    const state: LiveState = { ...(this.live.get(deviceId) ?? { last_heartbeat: null, connection: 'mqtt' }), status: 'offline' };
    this.live.set(deviceId, state);
    this.pending.delete(deviceId);
    void this.publishStatus(deviceId, state);
    this.logger.warn({ deviceId }, 'device revoked');
    return true;
  }

  /** Drops what is cached about a device's credentials (after revocation, here or on another instance). */
  forget(deviceId: string): void {
    this.tokenHashes.delete(deviceId);
    // Rare (revocation, re-registration): a scan of the cache is fine.
    for (const [hash, id] of this.deviceByTokenHash.entries()) if (id === deviceId) this.deviceByTokenHash.delete(hash);
  }

  /** True when `token` is the current token of a registered, unrevoked device. */
  async authenticate(deviceId: string, token: string): Promise<boolean> {
    if (!DEVICE_ID.test(deviceId)) return false;
    let hash = this.tokenHashes.get(deviceId);
    if (hash === undefined) {
      const doc = await this.repos.devices.findOne({ device_id: deviceId });
      hash = (doc && !doc.revoked_at && doc.token_hash) || '';
      // An unknown name is remembered for a short while only.
      this.tokenHashes.set(deviceId, hash, hash ? undefined : { ttl: 5_000 });
    }
    return hash !== '' && equalHashes(hash, hashToken(token));
  }

  /** The device a bearer token belongs to, or null. */
  async byToken(token: string): Promise<string | null> {
    if (!token.startsWith('kxd_')) return null;
    const hash = hashToken(token);
    const cached = this.deviceByTokenHash.get(hash);
    if (cached !== undefined) return cached;
    const doc = await this.repos.devices.findOne({ token_hash: hash });
    if (!doc || doc.revoked_at) return null;
    this.deviceByTokenHash.set(hash, doc.device_id);
    return doc.device_id;
  }

  async exists(deviceId: string): Promise<boolean> {
    return (await this.repos.devices.count({ device_id: deviceId })) > 0;
  }

  /** Records a heartbeat in memory; the store sees it at the next flush. */
  heartbeat(deviceId: string, hb: Heartbeat, via: 'mqtt' | 'http'): void {
    this.counters.heartbeats++;
    const previous = this.live.get(deviceId);
    const session = via === 'mqtt' ? this.sessions.get(deviceId) : undefined;
    const state: LiveState = {
      status: hb.status ?? 'online',
      connection: via,
      last_heartbeat: now(),
      bundle_version: hb.bundle_version,
      config_version: hb.config_version,
      uptime: hb.uptime,
      metrics: hb.metrics,
    };
    if (session?.generation !== undefined) state.generation = session.generation;
    this.live.set(deviceId, state);
    this.pending.set(deviceId, { state, session });
    if (!previous || previous.status !== state.status || previous.bundle_version !== state.bundle_version) {
      void this.publishStatus(deviceId, state);
    }
  }

  /**
   * A device's MQTT connection is ready on this instance: claim its presence
   * now (one write per connection, not per heartbeat), so that what another
   * instance still has to say about an older connection no longer applies.
   */
  connected(deviceId: string): Promise<void> {
    const session: Session = {
      claim: this.repos.devices.findOneAndUpdate(
        { device_id: deviceId },
        {
          $inc: { mqtt_generation: 1 },
          $set: { status: 'online', connection: 'mqtt', mqtt_instance: this.options.instanceId, updated_at: now() },
        },
      ).then((doc) => {
        session.generation = doc?.mqtt_generation ?? undefined;
        return session.generation ?? null;
      }),
    };
    this.sessions.set(deviceId, session);
    return session.claim.then(
      (generation) => {
        if (generation === null || this.sessions.get(deviceId) !== session) return;
        const state: LiveState = {
          ...(this.live.get(deviceId) ?? { last_heartbeat: null }), status: 'online', connection: 'mqtt', generation,
        };
        this.live.set(deviceId, state);
        void this.publishStatus(deviceId, state);
      },
      (err: Error) => this.logger.error({ deviceId, err: err.message }, 'could not record that the device connected'),
    );
  }

  /** The device's connection to this instance ended; "offline" is written at the next flush, if still true. */
  disconnected(deviceId: string): void {
    const session = this.sessions.get(deviceId);
    if (!session) return;
    this.sessions.delete(deviceId);
    this.ended.set(deviceId, session);
  }

  /** Writes every buffered heartbeat and presence change in one batch. */
  flush(): Promise<void> {
    this.flushing = this.flushing.then(async () => {
      if (this.pending.size > 0) await this.flushHeartbeats();
      if (this.ended.size > 0) await this.flushEnded();
    });
    return this.flushing;
  }

  private async flushHeartbeats(): Promise<void> {
    const batch = this.pending;
    this.pending = new Map();
    const at = now();
    const ops: BulkUpdate[] = [];
    for (const [deviceId, { state: s, session }] of batch) {
      const filter: Record<string, unknown> = { device_id: deviceId };
      if (s.connection === 'mqtt') {
        // Only while the connection that sent it is still the device's newest.
        const generation = session ? await session.claim.catch(() => null) : null;
        if (generation === null) continue;
        filter.mqtt_generation = generation;
      } else if (s.status === 'offline') {
        // An HTTP device swept offline, unless a newer heartbeat got there first.
        filter.connection = 'http';
        filter.last_heartbeat = s.last_heartbeat;
      }
      const set: Record<string, unknown> = { status: s.status, connection: s.connection, updated_at: at };
      if (s.last_heartbeat) set.last_heartbeat = s.last_heartbeat;
      if (s.uptime !== undefined) set.uptime = s.uptime;
      if (s.metrics !== undefined) set.metrics = s.metrics;
      if (s.config_version !== undefined) set.config_version = s.config_version;
      ops.push({ filter, update: { $set: set } });
    }
    if (ops.length === 0) return;
    try {
      await this.repos.devices.bulkUpdate(ops);
      this.counters.flushes++;
      this.counters.flushedDevices += ops.length;
    } catch (err) {
      // Keep what failed unless a newer state arrived meanwhile; it goes with the next flush.
      for (const [id, entry] of batch) if (!this.pending.has(id)) this.pending.set(id, entry);
      this.logger.error({ err: (err as Error).message, devices: ops.length }, 'heartbeat flush failed; will retry');
    }
  }

  /**
   * "Offline" for connections that ended, each conditional on its generation:
   * when the device has meanwhile connected again (here or to another
   * instance), nothing is written and no offline status is published.
   */
  private async flushEnded(): Promise<void> {
    const batch = this.ended;
    this.ended = new Map();
    await Promise.all([...batch].map(async ([deviceId, session]) => {
      try {
        const generation = await session.claim.catch(() => null);
        if (generation === null) return;
        const res = await this.repos.devices.updateOne(
          { device_id: deviceId, mqtt_generation: generation },
          { $set: { status: 'offline', updated_at: now() } },
        );
        const live = this.live.get(deviceId);
        const current = live?.connection === 'mqtt' && live.generation === generation;
        if (res.matched === 0) {
          this.counters.staleOffline++;
          this.logger.debug({ deviceId, generation }, 'device reconnected meanwhile; its old connection\'s offline is not recorded');
          if (current) this.live.delete(deviceId);
          return;
        }
        if (current) {
          const state: LiveState = { ...live, status: 'offline' };
          this.live.set(deviceId, state);
          void this.publishStatus(deviceId, state);
        }
      } catch (err) {
        if (!this.ended.has(deviceId) && !this.sessions.has(deviceId)) this.ended.set(deviceId, session);
        this.logger.error({ deviceId, err: (err as Error).message }, 'could not record that the device disconnected; will retry');
      }
    }));
  }

  /**
   * Devices still marked online through a controller instance that is gone
   * (its broker fell silent on the shared Redis, e.g. it was killed) and that
   * have not reconnected elsewhere since `quietMs`: offline. Each write is
   * conditional on the connection generation seen, so a device that
   * reconnects meanwhile is left alone. One query, one batch.
   */
  async sweepOrphans(aliveInstances: string[], quietMs: number): Promise<number> {
    const cutoff = new Date(Date.now() - quietMs).toISOString();
    const orphans = await this.repos.devices.find({
      // Shaped for the (connection, status, mqtt_instance) index: bounds on all three.
      connection: 'mqtt', status: { $in: ['online', 'error'] },
      mqtt_instance: { $nin: [...new Set([...aliveInstances, this.options.instanceId])] },
      updated_at: { $lt: cutoff },
    }, { limit: 1000 });
    if (orphans.length === 0) return 0;
    const at = now();
    await this.repos.devices.bulkUpdate(orphans.map((d) => ({
      filter: { device_id: d.device_id, mqtt_generation: d.mqtt_generation ?? 0, status: { $ne: 'offline' } },
      update: { $set: { status: 'offline', updated_at: at } },
    })));
    const generation = new Map(orphans.map((d) => [d.device_id, d.mqtt_generation ?? 0]));
    const swept = (await this.repos.devices.find({ device_id: { $in: [...generation.keys()] }, updated_at: at, status: 'offline' }))
      .filter((d) => (d.mqtt_generation ?? 0) === generation.get(d.device_id));
    for (const d of swept) {
      void this.publishStatus(d.device_id, {
        status: 'offline', connection: 'mqtt', last_heartbeat: d.last_heartbeat, bundle_version: d.current_bundle_version,
        config_version: d.config_version,
      });
    }
    if (swept.length) {
      this.logger.info({ devices: swept.length, instances: [...new Set(orphans.map((d) => d.mqtt_instance))] },
        'devices of controller instances that are gone marked offline');
    }
    return swept.length;
  }

  /** A device's configured heartbeat interval, so a slow poller is not taken for gone. */
  setPollingInterval(deviceId: string, seconds: number): void {
    this.pollingIntervals.set(deviceId, seconds);
  }

  /**
   * HTTP-polling devices go offline when their heartbeats stop: after
   * httpOfflineAfterSeconds (90), or three configured intervals if longer.
   * Runs every 5 s; `at` is the time to judge by.
   */
  async sweep(at = Date.now()): Promise<void> {
    const base = this.options.httpOfflineAfterSeconds ?? 90;
    for (const [deviceId, s] of this.live) {
      if (s.connection !== 'http' || s.status === 'offline' || !s.last_heartbeat) continue;
      const allowed = Math.max(base, 3 * (this.pollingIntervals.get(deviceId) ?? 0));
      if (Date.parse(s.last_heartbeat) < at - allowed * 1000) {
        const state: LiveState = { ...s, status: 'offline' };
        this.live.set(deviceId, state);
        this.pending.set(deviceId, { state });
        void this.publishStatus(deviceId, state);
      }
    }
  }

  private publishStatus(deviceId: string, s: LiveState): Promise<void> {
    return this.publisher.status({
      device_id: deviceId, status: s.status, last_heartbeat: s.last_heartbeat,
      bundle_version: s.bundle_version ?? null, config_version: s.config_version ?? null, changed_at: now(),
    });
  }

  /**
   * A device as the API shows it, with this instance's fresher in-memory
   * state where it still applies: an MQTT state only while its connection is
   * the device's newest (another instance may hold the device by now).
   */
  private view(doc: DeviceDoc): Record<string, unknown> {
    const s = this.live.get(doc.device_id);
    const session = this.sessions.get(doc.device_id);
    const applies = s && (s.connection === 'mqtt'
      // Held here: newest unless another instance has claimed the device since
      // (an unanswered claim is newer than anything the store holds).
      ? (session !== undefined && (session.generation === undefined || session.generation >= (doc.mqtt_generation ?? 0))) ||
        (s.generation !== undefined && s.generation === doc.mqtt_generation)
      : !(doc.connection === 'mqtt' && doc.status !== 'offline'));
    const merged: DeviceDoc = s && applies
      ? {
          ...doc, status: s.status, connection: s.connection,
          last_heartbeat: s.last_heartbeat ?? doc.last_heartbeat,
          config_version: s.config_version ?? doc.config_version,
          uptime: s.uptime ?? doc.uptime,
        }
      : doc;
    return present(merged, ['token_hash', 'mqtt_generation']);
  }

  async list(filter: { status?: DeviceStatus; limit?: number; skip?: number } = {}): Promise<Record<string, unknown>[]> {
    const { status, limit, skip = 0 } = filter;
    if (!status) return (await this.repos.devices.find({}, { sort: { device_id: 1 }, limit, skip })).map((d) => this.view(d));
    // Presence is the stored one overlaid with what this instance knows now, so
    // the filter applies to the views, and the page is taken from what passes it.
    const matching = (await this.repos.devices.find({}, { sort: { device_id: 1 } }))
      .map((d) => this.view(d)).filter((v) => v.status === status);
    return matching.slice(skip, limit === undefined ? undefined : skip + limit);
  }

  /** Devices by presence, counted as list() shows them. */
  async countByStatus(): Promise<Record<DeviceStatus | 'total', number>> {
    const counts = { total: 0, online: 0, offline: 0, error: 0 };
    for (const doc of await this.repos.devices.find({})) {
      counts.total++;
      counts[this.view(doc).status as DeviceStatus]++;
    }
    return counts;
  }

  async get(deviceId: string): Promise<Record<string, unknown>> {
    const doc = await this.repos.devices.findOne({ device_id: deviceId });
    if (!doc) throw notFound(`device ${deviceId}`);
    return this.view(doc);
  }

  /** Called when a deployment succeeds: the version the device now runs. */
  async setBundleVersion(deviceId: string, version: string): Promise<void> {
    await this.repos.devices.updateOne({ device_id: deviceId }, { $set: { current_bundle_version: version, updated_at: now() } });
    const s = this.live.get(deviceId);
    if (s) {
      s.bundle_version = version;
      void this.publishStatus(deviceId, s);
    }
  }

  /** Device ids that do not exist, among `ids` (one query). */
  async missing(ids: string[]): Promise<string[]> {
    // The usual answer is "none": a count says so without reading N documents.
    const unique = [...new Set(ids)];
    if ((await this.repos.devices.count({ device_id: { $in: unique } })) === unique.length) return [];
    const found = await this.repos.devices.find({ device_id: { $in: ids } });
    const known = new Set(found.map((d) => d.device_id));
    return ids.filter((id) => !known.has(id));
  }
}
