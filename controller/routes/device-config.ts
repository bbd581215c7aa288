// /api/v1/devices/{id}/config: a device's desired configuration.
import type { FastifyInstance } from 'fastify';
import type { Guard, HttpOptions } from '../http.js';
import { forbidden } from '../errors.js';
import { ConfigService } from '../services/configs.js';
import { deviceIdParam } from './params.js';

export async function deviceConfigRoutes(api: FastifyInstance, opts: HttpOptions & { guard: Guard }): Promise<void> {
  const { configs } = opts.services;
  const { guard } = opts;

  api.get('/devices/:device_id/config', { preHandler: guard('viewer', 'device') }, async (req) => {
    const deviceId = deviceIdParam(req.params);
    if (req.principal?.kind === 'device' && req.principal.deviceId !== deviceId) {
      throw forbidden('a device may only read its own configuration');
    }
    return ConfigService.view(await configs.get(deviceId));
  });

  api.put('/devices/:device_id/config', { preHandler: guard('operator') }, async (req) => {
    const deviceId = deviceIdParam(req.params);
    const patch = ConfigService.parseUpdate(req.body);
    return ConfigService.view(await configs.update(deviceId, patch));
  });
}
