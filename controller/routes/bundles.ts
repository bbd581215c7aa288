// /api/v1/bundles: upload, catalogue, and download with HTTP Range.
import type { FastifyInstance } from 'fastify';
import parseRange from 'range-parser';
import { BUNDLE_SIGNATURE_PATTERN } from '../../schemas/index.js';
import type { Guard, HttpOptions } from '../http.js';
import { ApiError, badRequest } from '../errors.js';
import { present } from '../model.js';
import { idParam } from './params.js';

// Room for multipart boundaries, part headers and a signature field.
const MULTIPART_OVERHEAD = 64 * 1024;

/**
 * The detached signature of an upload, from the X-Kernex-Signature header or a
 * "signature" form field sent before the file; null when there is none.
 */
function uploadSignature(header: string | string[] | undefined, field: unknown): string | null {
  let value: unknown = header;
  if (value === undefined && field !== undefined) {
    const f = Array.isArray(field) ? field[0] : field;
    value = f && typeof f === 'object' && 'value' in f ? (f as { value: unknown }).value : undefined;
    if (value === undefined) throw badRequest('the "signature" field must be a text field sent before the file', 'invalid_signature');
  }
  if (value === undefined) return null;
  if (typeof value !== 'string' || !BUNDLE_SIGNATURE_PATTERN.test(value.trim())) {
    throw badRequest('the signature must be one line "ed25519:<key id>:<base64>" as made by kernexctl bundles sign', 'invalid_signature');
  }
  return value.trim();
}

export async function bundleRoutes(api: FastifyInstance, opts: HttpOptions & { guard: Guard }): Promise<void> {
  const { bundles } = opts.services;
  const { guard } = opts;

  api.post('/bundles', { preHandler: guard('operator') }, async (req, reply) => {
    if (!req.isMultipart()) throw badRequest('upload the bundle as multipart/form-data with a "file" field');
    // An upload announced as too large is refused before a byte of it is read.
    const declared = Number(req.headers['content-length']);
    if (Number.isFinite(declared) && declared > opts.maxBundleBytes + MULTIPART_OVERHEAD) {
      throw new ApiError(413, 'bundle_too_large', `bundle exceeds the limit of ${opts.maxBundleBytes} bytes`);
    }
    const part = await req.file();
    if (!part) throw badRequest('the request has no file; send the bundle in a "file" field');
    if (part.fieldname !== 'file') throw badRequest(`unexpected field '${part.fieldname}'; send the bundle in a "file" field`);
    const signature = uploadSignature(req.headers['x-kernex-signature'], part.fields.signature);
    const doc = await bundles.upload(part.file, part.filename, { signature });
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
