// Who may do what, administered: API and enrollment tokens created, listed and
// revoked, devices revoked. Every change is written to the audit log and
// revocations are announced to every controller instance, so caches and open
// MQTT connections go at once, wherever they are.
import { randomUUID } from 'node:crypto';
import type { Logger } from 'pino';
import type { Principal, Revocation } from '../../broker/index.js';
import type { TokenRequest } from '../../schemas/index.js';
import type { Repositories } from '../model.js';
import { now } from '../model.js';
import { badRequest, notFound } from '../errors.js';
import type { TokenService } from './tokens.js';
import type { DeviceService } from './devices.js';

const actorName = (p: Principal | null): string =>
  !p ? 'system' : p.kind === 'device' ? `device:${p.deviceId}` : `${p.role}:${p.name}`;

export class AccessService {
  constructor(
    private repos: Repositories,
    private tokens: TokenService,
    private devices: DeviceService,
    private logger: Logger,
    private announce: (revocation: Revocation) => Promise<void>,
  ) {}

  /** Creates a token; the secret is in the answer only, never stored or shown again. */
  async createToken(actor: Principal | null, req: TokenRequest): Promise<Record<string, unknown>> {
    let expiresAt: string | null = null;
    if (req.ttl_seconds !== undefined) expiresAt = new Date(Date.now() + req.ttl_seconds * 1000).toISOString();
    if (req.expires_at !== undefined) {
      const at = Date.parse(req.expires_at);
      if (!(at > Date.now())) throw badRequest(`expires_at ${req.expires_at} is not in the future`);
      expiresAt = new Date(at).toISOString();
    }
    const { token, doc } = await this.tokens.create(req.role, req.name, expiresAt, actorName(actor));
    await this.audit(actor, 'token.create', doc._id, { role: req.role, name: req.name, expires_at: expiresAt });
    return { ...this.tokens.view(doc), token };
  }

  listTokens(): Promise<Record<string, unknown>[]> {
    return this.tokens.list();
  }

  async revokeToken(actor: Principal | null, id: string): Promise<Record<string, unknown>> {
    const doc = await this.tokens.get(id);
    if (!doc) throw notFound(`token ${id}`);
    const changed = await this.tokens.revoke(id);
    if (changed) {
      await this.audit(actor, 'token.revoke', id, { role: doc.role, name: doc.name });
      await this.announceSafely({ kind: 'token', id });
    }
    return this.tokens.view((await this.tokens.get(id)) ?? doc);
  }

  async revokeDevice(actor: Principal | null, deviceId: string): Promise<{ device_id: string; revoked: true; revoked_at: string }> {
    const changed = await this.devices.revoke(deviceId);
    if (changed) {
      await this.audit(actor, 'device.revoke', deviceId, null);
      await this.announceSafely({ kind: 'device', id: deviceId });
    }
    const view = await this.devices.get(deviceId);
    return { device_id: deviceId, revoked: true, revoked_at: String(view.revoked_at) };
  }

  /**
   * A device registered again and got a fresh token: the old one stops working
   * everywhere, as after a revocation (caches dropped, connections made with it
   * closed on every instance), but the device itself stays enrolled.
   */
  async deviceTokenReplaced(deviceId: string): Promise<void> {
    await this.announceSafely({ kind: 'device', id: deviceId });
  }

  /** Applies a revocation announced by any instance to this one's caches. */
  applyRevocation(revocation: Revocation): void {
    if (revocation.kind === 'device') this.devices.forget(revocation.id);
    else this.tokens.forgetAll();
  }

  private async announceSafely(revocation: Revocation): Promise<void> {
    // The store already says revoked; a failed announcement only delays other
    // instances until their caches expire, so it is logged, not thrown.
    await this.announce(revocation).catch((err: Error) =>
      this.logger.error({ err: err.message, revocation }, 'could not announce the revocation to other instances'));
  }

  private async audit(actor: Principal | null, action: string, target: string, details: Record<string, unknown> | null) {
    await this.repos.audit.insertOne({ _id: randomUUID(), at: now(), actor: actorName(actor), action, target, details });
  }
}
