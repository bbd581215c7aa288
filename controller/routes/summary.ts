// /api/v1/summary: the fleet at a glance, counted on the controller rather
// than by listing every device to the client (kernexctl status).
import type { FastifyInstance } from 'fastify';
import type { FleetSummary } from '../../schemas/index.js';
import type { Guard, HttpOptions } from '../http.js';

export async function summaryRoutes(api: FastifyInstance, opts: HttpOptions & { guard: Guard }): Promise<void> {
  const { devices, deployments } = opts.services;
  api.get('/summary', { preHandler: opts.guard('viewer') }, async (): Promise<FleetSummary> => {
    const [byStatus, running] = await Promise.all([devices.countByStatus(), deployments.running()]);
    return { devices: byStatus, deployments: { running } };
  });
}
