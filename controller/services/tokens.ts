// API tokens (operators, integrators) and enrollment tokens. Only hashes are
// stored; the first start writes an admin credential file into the data dir.
import { createHash, randomBytes, randomUUID } from 'node:crypto';
import { mkdir, readFile, writeFile, rename } from 'node:fs/promises';
import { join } from 'node:path';
import { LRUCache } from 'lru-cache';
import type { Logger } from 'pino';
import type { Repositories, TokenDoc } from '../model.js';
import { now, present } from '../model.js';
import type { Role } from '../../broker/index.js';

export const hashToken = (token: string): string => createHash('sha256').update(token).digest('hex');

/** Tokens are random 192-bit strings, so a plain sha256 is enough to store them. */
export const newToken = (prefix: string): string => `${prefix}_${randomBytes(24).toString('base64url')}`;

export interface Credentials {
  server: string;
  mqtt: string;
  token: string;
  role: 'admin';
  enrollment_token: string;
  created_at: string;
}

// Tokens are looked up on every request and MQTT login. The cache is keyed by
// whatever a client presents, so it is bounded (least recently used go first),
// and an unknown token is remembered only briefly.
const CACHE_MS = 30_000;
const UNKNOWN_CACHE_MS = 5_000;
const CACHE_ENTRIES = 10_000;

export class TokenService {
  private cache = new LRUCache<string, { doc: TokenDoc | null }>({ max: CACHE_ENTRIES, ttl: CACHE_MS });

  constructor(private repos: Repositories, private logger: Logger) {}

  async create(
    role: TokenDoc['role'], name: string, expiresAt: string | null = null, createdBy: string | null = null,
  ): Promise<{ token: string; doc: TokenDoc }> {
    const token = newToken(role === 'enrollment' ? 'kxe' : 'kxt');
    const doc: TokenDoc = {
      _id: randomUUID(), token_hash: hashToken(token), role, name,
      created_at: now(), expires_at: expiresAt, revoked_at: null, created_by: createdBy,
    };
    await this.repos.tokens.insertOne(doc);
    this.logger.info({ tokenId: doc._id, role, name, expiresAt }, 'token created');
    return { token, doc };
  }

  /** The live token document for `token`, or null (unknown, revoked, expired). */
  async lookup(token: string, roles?: Array<TokenDoc['role']>): Promise<TokenDoc | null> {
    if (token.length === 0 || token.length > 512) return null;
    const hash = hashToken(token);
    let doc: TokenDoc | null;
    const cached = this.cache.get(hash);
    if (cached) {
      doc = cached.doc;
    } else {
      doc = await this.repos.tokens.findOne({ token_hash: hash });
      this.cache.set(hash, { doc }, doc ? undefined : { ttl: UNKNOWN_CACHE_MS });
    }
    if (!doc || doc.revoked_at) return null;
    if (doc.expires_at && doc.expires_at < now()) return null;
    if (roles && !roles.includes(doc.role)) return null;
    return doc;
  }

  /** Every token, newest first, as the API shows them (never the hash). */
  async list(): Promise<Record<string, unknown>[]> {
    const docs = await this.repos.tokens.find({}, { sort: { created_at: -1 } });
    return docs.map((d) => this.view(d));
  }

  async get(id: string): Promise<TokenDoc | null> {
    return this.repos.tokens.findOne({ _id: id });
  }

  view(doc: TokenDoc): Record<string, unknown> {
    const expired = doc.expires_at !== null && doc.expires_at < now();
    return { ...present(doc, ['token_hash']), active: !doc.revoked_at && !expired };
  }

  /** Revokes a token; false when it was revoked already. Cached lookups are dropped at once. */
  async revoke(id: string): Promise<boolean> {
    const res = await this.repos.tokens.updateOne({ _id: id, revoked_at: null }, { $set: { revoked_at: now() } });
    this.forgetAll();
    if (res.matched > 0) this.logger.warn({ tokenId: id }, 'token revoked');
    return res.matched > 0;
  }

  /** Drops every cached lookup (after a revocation here or on another instance). */
  forgetAll(): void {
    this.cache.clear();
  }

  /**
   * Makes sure an admin credential exists and is written to
   * `<dataDir>/credentials.json` (mode 0600), so a local kernexctl finds it.
   */
  async bootstrap(dataDir: string, urls: { server: string; mqtt: string }): Promise<{ file: string; created: boolean }> {
    const file = join(dataDir, 'credentials.json');
    try {
      const existing = JSON.parse(await readFile(file, 'utf8')) as Credentials;
      if (existing.token && (await this.lookup(existing.token, ['admin']))) {
        if (existing.server !== urls.server || existing.mqtt !== urls.mqtt) {
          await this.writeCredentials(file, { ...existing, ...urls });
        }
        return { file, created: false };
      }
    } catch {
      // Absent or unreadable: issue a fresh credential below.
    }
    const admin = await this.create('admin', 'bootstrap admin');
    const enrollment = await this.create('enrollment', 'default enrollment');
    await this.writeCredentials(file, {
      ...urls, token: admin.token, role: 'admin', enrollment_token: enrollment.token, created_at: now(),
    });
    this.logger.info({ file }, 'created admin and enrollment credentials');
    return { file, created: true };
  }

  private async writeCredentials(file: string, creds: Credentials): Promise<void> {
    await mkdir(join(file, '..'), { recursive: true });
    const tmp = `${file}.tmp`;
    await writeFile(tmp, JSON.stringify(creds, null, 2) + '\n', { mode: 0o600 });
    await rename(tmp, file);
  }

  /** Resolves a token presented as an MQTT password or HTTP bearer to its role. */
  async role(token: string): Promise<{ role: Role; doc: TokenDoc } | null> {
    const doc = await this.lookup(token, ['admin', 'operator', 'viewer', 'integrator']);
    return doc ? { role: doc.role as Role, doc } : null;
  }
}
