// /api/v1/devices/{id}/bundle-history and /api/v1/devices/rollback.
import type { FastifyInstance } from 'fastify';
import { validate } from '../../schemas/index.js';
import type { Guard, HttpOptions } from '../http.js';
import { forbidden } from '../errors.js';
import { deviceIdParam, intQuery } from './params.js';

export async function rollbackRoutes(api: FastifyInstance, opts: HttpOptions & { guard: Guard }): Promise<void> {
  const { history, rollbacks } = opts.services;
  const { guard } = opts;

  api.get('/devices/:device_id/bundle-history', { preHandler: guard('viewer', 'device') }, async (req) => {
    const deviceId = deviceIdParam(req.params);
    if (req.principal?.kind === 'device' && req.principal.deviceId !== deviceId) {
      throw forbidden('a device may only read its own history');
    }
    return history.list(deviceId, intQuery(req.query, 'limit', 20, 1, 100));
  });

  api.post('/devices/rollback', { preHandler: guard('operator') }, async (req, reply) => {
    const body = validate.rollbackRequest.parse(req.body);
    return reply.code(201).send(await rollbacks.create(body));
  });
}
