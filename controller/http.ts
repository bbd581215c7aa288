// The fastify application: error shape, authentication, and the routes.
import Fastify, { LogController, type FastifyBaseLogger, type FastifyInstance, type FastifyReply, type FastifyRequest } from 'fastify';
import multipart from '@fastify/multipart';
import type { Logger } from 'pino';
import { SchemaError } from '../schemas/index.js';
import type { Principal } from '../broker/index.js';
import { ApiError, badRequest, forbidden, unauthorized } from './errors.js';
import { StoreUnavailableError } from './store/index.js';
import { BlobStoreUnavailableError } from './blobs/index.js';
import type { Services } from './services/index.js';
import { deviceRoutes } from './routes/devices.js';
import { bundleRoutes } from './routes/bundles.js';
import { deploymentRoutes } from './routes/deployments.js';
import { healthRoutes } from './routes/health.js';
import { summaryRoutes } from './routes/summary.js';
import { deviceConfigRoutes } from './routes/device-config.js';
import { rollbackRoutes } from './routes/rollback.js';
import { registerOpenApi } from './openapi.js';
import { accessRoutes } from './routes/access.js';

declare module 'fastify' {
  interface FastifyRequest {
    principal: Principal | null;
  }
}

/** Who may call a route: a minimum user role, or a device acting for itself. */
export type Access = 'admin' | 'operator' | 'viewer' | 'device';

// Integrator credentials are for MQTT (read-only fleet topics); they rank
// below viewer, so no REST route admits them.
const RANK: Record<string, number> = { integrator: 0, viewer: 1, operator: 2, admin: 3 };

export function allows(principal: Principal | null, access: Access[]): boolean {
  if (!principal) return false;
  if (principal.kind === 'device') return access.includes('device');
  return access.some((a) => a !== 'device' && RANK[principal.role]! >= RANK[a]!);
}

/**
 * Two info lines per request would be the loudest thing a fleet does
 * (registrations, HTTP heartbeats, bundle downloads): one debug line per
 * request instead; a request that errored is still logged as an error.
 */
class QuietRequestLog extends LogController {
  override incomingRequest(): void {}

  override requestCompleted(error: Error | null | undefined, request: FastifyRequest, reply: FastifyReply): void {
    if (error) return super.requestCompleted(error, request, reply);
    reply.log.debug({ method: request.method, url: request.url, status: reply.statusCode, ms: Math.round(reply.elapsedTime) }, 'request');
  }
}

export interface HttpOptions {
  services: Services;
  logger: Logger;
  /** The MQTT URL a registering device is told, given the host name it reached us by. */
  deviceMqttUrl: (hostname: string) => string;
  maxBundleBytes: number;
  /** Serve Swagger UI at /api/v1/docs. */
  docsUi?: boolean;
  /** Serve HTTPS with this certificate and key. */
  https?: { cert: string; key: string };
}

export async function createHttpApp(opts: HttpOptions): Promise<FastifyInstance> {
  // pino.Logger and fastify's logger type differ only nominally; the https
  // variant of fastify's options has its own server type, used the same way.
  const app = Fastify({
    loggerInstance: opts.logger as FastifyBaseLogger,
    bodyLimit: 1024 * 1024,
    trustProxy: true,
    ...(opts.https ? { https: opts.https } : {}),
    logController: new QuietRequestLog(),
  }) as unknown as FastifyInstance;
  // One byte over the limit, so the blob store's own meter is what refuses an oversized bundle (413).
  await app.register(multipart, { limits: { fileSize: opts.maxBundleBytes + 1, files: 1, fields: 8 } });
  // Before the routes: the swagger plugin collects them as they are added.
  await registerOpenApi(app, { ui: opts.docsUi ?? true });

  app.decorateRequest('principal', null);
  // Query parameters are flat names; `status[$ne]=x` or `$where=...` is an attempt at a query operator.
  app.addHook('onRequest', async (req) => {
    for (const name of Object.keys((req.query ?? {}) as object)) {
      if (!/^[A-Za-z0-9_.-]{1,64}$/.test(name)) throw badRequest(`query parameter '${name.slice(0, 64)}' is not allowed`);
    }
  });
  app.addHook('onRequest', async (req) => {
    const header = req.headers.authorization;
    if (!header) return;
    const match = /^Bearer\s+(\S+)$/i.exec(header);
    if (!match) throw unauthorized('the Authorization header must be "Bearer <token>"');
    req.principal = await opts.services.authenticateBearer(match[1]!);
    if (!req.principal) throw unauthorized('the token is unknown, expired or revoked');
  });

  app.setErrorHandler((err: Error & { statusCode?: number; code?: string }, req, reply) => {
    if (err instanceof ApiError) {
      if (err.statusCode === 413) boundDrain(req);
      return reply.code(err.statusCode).send({ error: err.code, message: err.message });
    }
    if (err instanceof SchemaError) return reply.code(400).send({ error: 'invalid_request', message: err.message });
    if (err instanceof StoreUnavailableError) {
      req.log.error({ err: err.message }, 'store unavailable');
      return reply.code(503).header('retry-after', '5')
        .send({ error: 'store_unavailable', message: 'the data store is unavailable; retry shortly' });
    }
    if (err instanceof BlobStoreUnavailableError) {
      req.log.error({ err: err.message }, 'bundle store unavailable');
      return reply.code(503).header('retry-after', '5')
        .send({ error: 'blob_store_unavailable', message: 'the bundle store is unavailable; retry shortly' });
    }
    if (err.statusCode && err.statusCode < 500) {
      const code = err.code === 'FST_ERR_CTP_INVALID_JSON_BODY' || err.code === 'FST_ERR_CTP_EMPTY_JSON_BODY'
        ? 'invalid_json' : (err.code ?? 'bad_request').toLowerCase();
      return reply.code(err.statusCode).send({ error: code, message: err.message });
    }
    req.log.error({ err }, 'request failed');
    return reply.code(500).send({ error: 'internal', message: 'internal error; the controller log has the details' });
  });
  app.setNotFoundHandler((req, reply) =>
    reply.code(404).send({ error: 'not_found', message: `no route ${req.method} ${req.url.split('?')[0]}` }),
  );

  const guard = (...access: Access[]) => async (req: FastifyRequest, _reply: FastifyReply) => {
    if (!req.principal) throw unauthorized();
    if (!allows(req.principal, access)) throw forbidden(`this token may not ${req.method} ${req.routeOptions.url}`);
  };

  await app.register(async (api) => {
    await healthRoutes(api, opts);
    await summaryRoutes(api, { ...opts, guard });
    await deviceRoutes(api, { ...opts, guard });
    await bundleRoutes(api, { ...opts, guard });
    await deploymentRoutes(api, { ...opts, guard });
    await deviceConfigRoutes(api, { ...opts, guard });
    await rollbackRoutes(api, { ...opts, guard });
    await accessRoutes(api, { ...opts, guard });
  }, { prefix: '/api/v1' });
  return app;
}

// After refusing an oversized body, the rest of it is read and discarded for a
// little while (so the client, still sending, gets to read the answer rather
// than a connection reset), then the connection is cut.
const DRAIN_BYTES = 16 * 1024 * 1024;
const DRAIN_MS = 5_000;

function boundDrain(req: FastifyRequest): void {
  const raw = req.raw;
  let drained = 0;
  const cut = () => raw.socket?.destroy();
  const timer = setTimeout(cut, DRAIN_MS).unref();
  raw.on('data', (chunk: Buffer) => {
    drained += chunk.length;
    if (drained > DRAIN_BYTES) cut();
  });
  raw.once('end', () => clearTimeout(timer));
  raw.once('close', () => clearTimeout(timer));
}

export type Guard = (...access: Access[]) => (req: FastifyRequest, reply: FastifyReply) => Promise<void>;
