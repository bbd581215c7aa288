// /api/v1/bundles: upload, catalogue, and download with HTTP Range.
import type { FastifyInstance } from 'fastify';
import parseRange from 'range-parser';
import type { Guard, HttpOptions } from '../http.js';
import { badRequest } from '../errors.js';
import { present } from '../model.js';
import { idParam } from './params.js';

export async function bundleRoutes(api: FastifyInstance, opts: HttpOptions & { guard: Guard }): Promise<void> {
  const { bundles } = opts.services;
  const { guard } = opts;

  api.post('/bundles', { preHandler: guard('operator') }, async (req, reply) => {
    if (!req.isMultipart()) throw badRequest('upload the bundle as multipart/form-data with a "file" field');
    const part = await req.file();
    if (!part) throw badRequest('the request has no file; send the bundle in a "file" field');
    if (part.fieldname !== 'file') throw badRequest(`unexpected field '${part.fieldname}'; send the bundle in a "file" field`);
    const doc = await bundles.upload(part.file, part.filename);
    return reply.code(201).send(present(doc));
  });

  api.get('/bundles', { preHandler: guard('viewer') }, async () => bundles.list());

  api.get('/bundles/:id/info', { preHandler: guard('viewer', 'device') }, async (req) =>
    present(await bundles.get(idParam(req.params))),
  );

  api.get('/bundles/:id', { preHandler: guard('viewer', 'device') }, async (req, reply) => {
    const bundle = await bundles.get(idParam(req.params));
    const direct = await bundles.downloadUrl(bundle._id);
    // With an S3 backend the bytes never pass through the controller.
    if (direct) return reply.redirect(direct, 302);
    reply.header('accept-ranges', 'bytes');
    reply.header('content-type', 'application/octet-stream');
    reply.header('content-disposition', `attachment; filename="${bundle.filename.replace(/[^\w.-]/g, '_')}"`);
    reply.header('etag', `"${bundle.sha256}"`);
    const header = req.headers.range;
    if (header) {
      const ranges = parseRange(bundle.size, header, { combine: true });
      if (ranges === -1) {
        reply.header('content-range', `bytes */${bundle.size}`);
        reply.header('content-type', 'application/json; charset=utf-8');
        return reply.code(416).send({ error: 'range_not_satisfiable', message: `the bundle has ${bundle.size} bytes` });
      }
      if (ranges !== -2 && ranges.type === 'bytes' && ranges.length === 1) {
        const { start, end } = ranges[0]!;
        reply.code(206);
        reply.header('content-range', `bytes ${start}-${end}/${bundle.size}`);
        reply.header('content-length', end - start + 1);
        return reply.send(await bundles.read(bundle._id, { start, end }));
      }
    }
    reply.header('content-length', bundle.size);
    return reply.send(await bundles.read(bundle._id));
  });
}
