// /api/v1/deployments: create, inspect, and the REST result report.
import type { FastifyInstance } from 'fastify';
import { validate } from '../../schemas/index.js';
import type { Guard, HttpOptions } from '../http.js';
import { badRequest, forbidden, notFound } from '../errors.js';
import { enumQuery, idParam, intQuery } from './params.js';

export async function deploymentRoutes(api: FastifyInstance, opts: HttpOptions & { guard: Guard }): Promise<void> {
  const { deployments } = opts.services;
  const { guard } = opts;

  api.post('/deployments', { preHandler: guard('operator') }, async (req, reply) => {
    const body = validate.deploymentRequest.parse(req.body);
    const bundle = await deployments.resolveBundle(body);
    const dep = await deployments.create({
      bundle, targetDeviceIds: body.target_device_ids, kind: 'deploy', timeoutSeconds: body.timeout_seconds,
    });
    return reply.code(201).send(await deployments.get(dep._id));
  });

  api.get('/deployments', { preHandler: guard('viewer') }, async (req) => {
    const running = enumQuery(req.query, 'running', ['true', 'false'] as const);
    return deployments.list(intQuery(req.query, 'limit', 50, 1, 1000), { running: running === undefined ? undefined : running === 'true' });
  });

  api.get('/deployments/:id', { preHandler: guard('viewer') }, async (req) => deployments.get(idParam(req.params)));

  // The earlier system's way for a device to report an outcome.
  api.post('/deployments/:id/result', { preHandler: guard('device') }, async (req) => {
    const id = idParam(req.params);
    const body = validate.resultRequest.parse(req.body);
    if (req.principal?.kind !== 'device' || req.principal.deviceId !== body.device_id) {
      throw forbidden('a device may only report its own results');
    }
    if (body.status !== 'success' && body.status !== 'failed') {
      throw badRequest(`invalid status '${body.status}': must be success or failed`);
    }
    const dep = await deployments.getDoc(id);
    if (!dep) throw notFound(`deployment ${id}`);
    if (!dep.target_device_ids.includes(body.device_id)) {
      throw forbidden(`device ${body.device_id} is not a target of deployment ${id}`);
    }
    const duration = body.duration_seconds === undefined || body.duration_seconds === null ? undefined : Number(body.duration_seconds);
    const outcome = await deployments.recordResult(body.device_id, {
      deployment_id: id, status: body.status, error_message: body.error_message ?? null,
      exit_code: body.exit_code ?? null, output_tail: body.output_tail,
      duration_seconds: duration !== undefined && Number.isFinite(duration) && duration >= 0 ? duration : undefined,
    });
    return { deployment_id: id, device_id: body.device_id, status: body.status, recorded: outcome === 'recorded' };
  });
}
