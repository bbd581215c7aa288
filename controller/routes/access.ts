// /api/v1/tokens (admin) and device revocation: who may talk to Kernex.
import type { FastifyInstance } from 'fastify';
import { validate } from '../../schemas/index.js';
import type { Guard, HttpOptions } from '../http.js';
import { deviceIdParam, idParam } from './params.js';

export async function accessRoutes(api: FastifyInstance, opts: HttpOptions & { guard: Guard }): Promise<void> {
  const { access } = opts.services;
  const { guard } = opts;

  api.post('/tokens', { preHandler: guard('admin') }, async (req, reply) => {
    const body = validate.tokenRequest.parse(req.body);
    return reply.code(201).send(await access.createToken(req.principal, body));
  });

  api.get('/tokens', { preHandler: guard('admin') }, async () => access.listTokens());

  api.delete('/tokens/:id', { preHandler: guard('admin') }, async (req) => access.revokeToken(req.principal, idParam(req.params)));

  // Revocation only takes access away, so an operator on call may do it at once.
  api.post('/devices/:device_id/revoke', { preHandler: guard('operator') }, async (req) =>
    access.revokeDevice(req.principal, deviceIdParam(req.params)),
  );
}
