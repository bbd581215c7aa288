// API tokens (operators, integrators) and enrollment tokens. Only hashes are
// stored; the first start writes an admin credential file into the data dir.
import { createHash, randomBytes, randomUUID } from 'node:crypto';
import { mkdir, readFile, writeFile, rename } from 'node:fs/promises';
import { join } from 'node:path';
import type { Logger } from 'pino';
import type { Repositories, TokenDoc } from '../model.js';
import { now } from '../model.js';
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

const CACHE_MS = 30_000;

export class TokenService {
  private cache = new Map<string, { doc: TokenDoc | null; at: number }>();

  constructor(private repos: Repositories, private logger: Logger) {}

  async create(role: TokenDoc['role'], name: string, expiresAt: string | null = null): Promise<{ token: string; doc: TokenDoc }> {
    const token = newToken(role === 'enrollment' ? 'kxe' : 'kxt');
    const doc: TokenDoc = {
      _id: randomUUID(), token_hash: hashToken(token), role, name,
      created_at: now(), expires_at: expiresAt, revoked_at: null,
    };
    await this.repos.tokens.insertOne(doc);
    return { token, doc };
  }

  /** The live token document for `token`, or null (unknown, revoked, expired). */
  async lookup(token: string, roles?: Array<TokenDoc['role']>): Promise<TokenDoc | null> {
    const hash = hashToken(token);
    const cached = this.cache.get(hash);
    let doc: TokenDoc | null;
    if (cached && Date.now() - cached.at < CACHE_MS) {
      doc = cached.doc;
    } else {
      doc = await this.repos.tokens.findOne({ token_hash: hash });
      this.cache.set(hash, { doc, at: Date.now() });
    }
    if (!doc || doc.revoked_at) return null;
    if (doc.expires_at && doc.expires_at < now()) return null;
    if (roles && !roles.includes(doc.role)) return null;
    return doc;
  }

  async revoke(id: string): Promise<boolean> {
    const res = await this.repos.tokens.updateOne({ _id: id, revoked_at: null }, { $set: { revoked_at: now() } });
    this.cache.clear();
    return res.matched > 0;
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
