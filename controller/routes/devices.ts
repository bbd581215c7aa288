// /api/v1/devices: registration, listing, and the HTTP heartbeat fallback.
import type { FastifyInstance } from 'fastify';
import { validate } from '../../schemas/index.js';
import type { Guard, HttpOptions } from '../http.js';
import { forbidden } from '../errors.js';
import { deviceIdParam, enumQuery, intQuery } from './params.js';

export async function deviceRoutes(api: FastifyInstance, opts: HttpOptions & { guard: Guard }): Promise<void> {
  const { devices, deployments, configs } = opts.services;
  const { guard } = opts;

  api.post('/devices/register', async (req, reply) => {
    const body = validate.registerRequest.parse(req.body);
    const { created, device, token } = await devices.register(body);
    if (!created) await opts.services.access.deviceTokenReplaced(device.device_id);
    const mqttUrl = opts.deviceMqttUrl(req.hostname.replace(/:\d+$/, ''));
    return reply.code(created ? 201 : 200).send({
      device_id: device.device_id, token, mqtt_url: mqttUrl, status: 'registered', created,
    });
  });

  api.get('/devices', { preHandler: guard('viewer') }, async (req) => {
    const status = enumQuery(req.query, 'status', ['online', 'offline', 'error'] as const);
    const limit = intQuery(req.query, 'limit', 10_000, 1, 100_000);
    const skip = intQuery(req.query, 'skip', 0, 0, 10_000_000);
    return configs.annotate(await devices.list({ status, limit, skip }));
  });

  api.get('/devices/:device_id', { preHandler: guard('viewer', 'device') }, async (req) => {
    const deviceId = deviceIdParam(req.params);
    if (req.principal?.kind === 'device' && req.principal.deviceId !== deviceId) throw forbidden('a device may only read itself');
    const [view] = await configs.annotate([await devices.get(deviceId)]);
    return view;
  });

  // The earlier system's polling path, kept for devices that cannot hold an MQTT connection.
  api.post('/devices/:device_id/heartbeat', { preHandler: guard('device') }, async (req) => {
    const deviceId = deviceIdParam(req.params);
    if (req.principal?.kind !== 'device' || req.principal.deviceId !== deviceId) {
      throw forbidden('a device may only send its own heartbeat');
    }
    const hb = validate.heartbeat.parse(req.body ?? {});
    devices.heartbeat(deviceId, hb, 'http');
    // Unfinished deploys and rollbacks, then the configuration if the device is behind.
    const [commands, configure] = await Promise.all([
      deployments.pendingCommands(deviceId), configs.pendingCommand(deviceId, hb.config_version),
    ]);
    return { commands: configure ? [...commands, configure] : commands };
  });
}
