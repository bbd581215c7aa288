import type { FastifyInstance } from 'fastify';
import type { HttpOptions } from '../http.js';
import { VERSION } from '../version.js';

export async function healthRoutes(api: FastifyInstance, opts: Pick<HttpOptions, 'deviceMqttUrl'>): Promise<void> {
  // The MQTT URL tells kernexctl (and integrators) where live events are, as registration tells devices.
  api.get('/health', async (req) => ({
    status: 'ok',
    version: VERSION,
    mqtt_url: opts.deviceMqttUrl(req.hostname.replace(/:\d+$/, '')),
  }));
}
