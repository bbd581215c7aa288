// The OpenAPI document of the REST API, served at /api/v1/openapi.json, with
// Swagger UI at /api/v1/docs.
//
// Routes carry no fastify `schema`: every body, parameter and query is checked
// by its handler with the validators of schemas/index.ts (one ajv, messages
// that say what to fix, the TypeScript type). A route schema would make
// fastify compile it with a second ajv of its own that coerces and strips
// fields before our check, and would make it filter responses through
// fast-json-stringify. So the documentation is attached here, at document
// time (the swagger plugin's `transform`), from the same JSON Schema files
// the validators are compiled from: what is documented is what is checked.
import type { FastifyInstance } from 'fastify';
import swagger from '@fastify/swagger';
import swaggerUi from '@fastify/swagger-ui';
import { schemas } from '../schemas/index.js';
import { VERSION } from './version.js';

type Json = Record<string, unknown>;

const byId = new Map<string, Json>(Object.values(schemas).map((s) => [(s as Json).$id as string, s as Json]));

function pointer(doc: Json, fragment: string): unknown {
  return fragment.split('/').filter(Boolean).reduce<unknown>((node, key) => (node as Json | undefined)?.[key], doc);
}

/**
 * A schema with every `$ref` (to another schema file or to its own `$defs`)
 * replaced by what it points to, and `$id`/`$defs` dropped: a self-contained
 * schema for the document. Our schemas are not recursive.
 */
export function inlineSchema(schema: unknown, root?: Json): unknown {
  if (Array.isArray(schema)) return schema.map((s) => inlineSchema(s, root));
  if (schema === null || typeof schema !== 'object') return schema;
  const node = schema as Json;
  const base = root ?? node;
  if (typeof node.$ref === 'string') {
    const [file, fragment] = node.$ref.split('#');
    const target = file ? byId.get(file) : base;
    if (!target) throw new Error(`unresolvable $ref ${node.$ref}`);
    const resolved = fragment ? pointer(target, fragment) : target;
    if (resolved === undefined) throw new Error(`unresolvable $ref ${node.$ref}`);
    return inlineSchema(resolved, target);
  }
  const out: Json = {};
  for (const [key, value] of Object.entries(node)) {
    if (key === '$id' || key === '$defs' || key === '$schema') continue;
    out[key] = inlineSchema(value, base);
  }
  return out;
}

const doc = (s: object) => inlineSchema(s) as Json;
/** A response: the schema, described for this route (the schema's own description is about the type). */
const answer = (description: string, s: object) => ({ ...doc(s), description });
const error = (description: string) => answer(description, schemas.apiError);
const arrayOf = (description: string, s: object) => ({ description, type: 'array', items: doc(s) });

const deviceIdParams = {
  type: 'object', required: ['device_id'],
  properties: { device_id: { ...doc(schemas.common.$defs.deviceId), description: 'The device id.' } },
};
const idParams = (what: string) => ({
  type: 'object', required: ['id'], properties: { id: { ...doc(schemas.common.$defs.id), description: `The ${what} id.` } },
});
const limitQuery = (fallback: number, max: number) => ({
  type: 'object',
  properties: { limit: { type: 'integer', minimum: 1, maximum: max, default: fallback, description: `At most this many (1 to ${max}).` } },
});

const BEARER = [{ bearer: [] }];
const common = {
  401: error('No token, or an unknown, expired or revoked one.'),
  403: error('The token may not do this (role too low, or a device acting for another).'),
};

/** The documentation of each route, by fastify method and URL. */
export const ROUTE_DOCS: Record<string, Json> = {
  'GET /api/v1/health': {
    tags: ['health'], summary: 'Liveness and version', security: [],
    response: { 200: { description: 'The controller is up.', type: 'object', properties: { status: { const: 'ok' }, version: { type: 'string' } } } },
  },

  'GET /api/v1/summary': {
    tags: ['health'], summary: 'Devices by presence and running deployments, counted on the controller', security: BEARER,
    response: { 200: answer('The fleet at a glance.', schemas.fleetSummary), ...common },
  },

  'POST /api/v1/devices/register': {
    tags: ['devices'], summary: 'Register a device (idempotent for the same id and key)', security: [],
    description: 'Needs an enrollment token and a proof of possession: `timestamp` (now) and `signature`, the base64 signature ' +
      'over "kernex-register:<device_id>:<timestamp>" with the private key of `public_key` (at most 300 s off the controller\'s ' +
      'clock, newer than the last proof for this device). The same device id with the same public key registers again and gets ' +
      'a fresh token (the old one stops working); another key for an existing id is 409.',
    body: doc(schemas.registerRequest),
    response: {
      200: answer('Registered again (same id and key); a fresh token.', schemas.registerResponse),
      201: answer('Registered.', schemas.registerResponse),
      400: error('Invalid body (e.g. a device id that is not a safe topic segment).'),
      401: error('No valid enrollment token, or a missing, stale or wrong proof of possession.'),
      403: error('The device has been revoked.'),
      409: error('Another public key already holds this device id.'),
    },
  },
  'GET /api/v1/devices': {
    tags: ['devices'], summary: 'List devices', security: BEARER,
    querystring: {
      type: 'object',
      properties: {
        status: { enum: ['online', 'offline', 'error'] },
        limit: { type: 'integer', minimum: 1, maximum: 100000, default: 10000 },
        skip: { type: 'integer', minimum: 0, default: 0 },
      },
    },
    response: { 200: arrayOf('Devices by id, with presence and whether each applied its latest configuration.', schemas.deviceView), 400: error('A bad query parameter.'), ...common },
  },
  'GET /api/v1/devices/:device_id': {
    tags: ['devices'], summary: 'One device', security: BEARER, params: deviceIdParams,
    response: { 200: answer('The device.', schemas.deviceView), ...common, 404: error('No such device.') },
  },
  'POST /api/v1/devices/:device_id/heartbeat': {
    tags: ['devices'], summary: 'HTTP heartbeat: the fallback for devices without an MQTT connection', security: BEARER,
    description: 'With the device token. Records the heartbeat and answers with the commands the device has not finished ' +
      '(deploy, rollback; oldest first) and a configure command when its config_version is behind. A device that holds ' +
      'an MQTT connection gets the same commands pushed instead.',
    params: deviceIdParams, body: doc(schemas.heartbeat),
    response: { 200: answer('Pending commands.', schemas.heartbeatResponse), 400: error('Invalid heartbeat.'), ...common },
  },
  'GET /api/v1/devices/:device_id/config': {
    tags: ['configuration'], summary: "A device's configuration (the defaults are created on first read)", security: BEARER,
    description: 'Defaults: polling_interval 60, heartbeat_timeout 30, deploy_timeout 300, log_level INFO, metadata_json null, ' +
      'version 1. Creating them makes them the device\'s configuration: they are delivered like an update.',
    params: deviceIdParams,
    response: { 200: answer('The configuration.', schemas.deviceConfigView), ...common, 404: error('No such device.') },
  },
  'PUT /api/v1/devices/:device_id/config': {
    tags: ['configuration'], summary: "Update a device's configuration", security: BEARER,
    description: 'Changes only the fields given, adds one to version and delivers the result at once: retained on ' +
      'kernex/devices/{id}/config, as a configure command to a connected device, and in the HTTP heartbeat answer. ' +
      'Numbers may be sent as numeric strings ("120").',
    params: deviceIdParams, body: doc(schemas.configUpdate),
    response: {
      200: answer('The new configuration.', schemas.deviceConfigView),
      400: error('An unknown field, a value out of bounds, or an empty body.'), ...common, 404: error('No such device.'),
    },
  },
  'GET /api/v1/devices/:device_id/bundle-history': {
    tags: ['rollback'], summary: "A device's deploy and rollback history, newest first", security: BEARER,
    params: deviceIdParams, querystring: limitQuery(20, 100),
    response: { 200: arrayOf('History entries by deployed_at, newest first.', schemas.bundleHistoryEntry), 400: error('A bad limit.'), ...common, 404: error('No such device.') },
  },
  'POST /api/v1/devices/rollback': {
    tags: ['rollback'], summary: 'Roll devices back to a version that once worked on each', security: BEARER,
    description: 'Creates a deployment of kind rollback and pushes a rollback command to every target. The agent reuses the ' +
      'bundle on its disk when intact and runs manifest.rollback.script (else deploy.script). On success the entry it ' +
      'replaced is marked rolled_back in the history.',
    body: doc(schemas.rollbackRequest),
    response: {
      201: answer('The rollback deployment.', schemas.rollbackResponse),
      400: error('unknown_bundle (no such version), unknown_device, no_successful_deployment (a target never ran that version successfully), or an invalid body.'),
      ...common,
    },
  },

  'POST /api/v1/bundles': {
    tags: ['bundles'], summary: 'Upload a bundle (.tar.gz with manifest.json)', security: BEARER,
    consumes: ['multipart/form-data'],
    description: 'An optional detached signature (ed25519:<key id>:<base64>, from `kernexctl bundles sign`) goes in the ' +
      'X-Kernex-Signature header or a `signature` field sent before the file; commands for the bundle carry it.',
    body: {
      type: 'object', required: ['file'],
      properties: {
        signature: { type: 'string', description: 'Detached Ed25519 signature of the archive (before the file).' },
        file: { type: 'string', format: 'binary', description: 'The bundle archive.' },
      },
    },
    response: {
      201: answer('Stored.', schemas.bundleView),
      400: error('Not a valid bundle (the message says why); nothing is stored.'), ...common,
      409: error('That version exists already.'), 413: error('Larger than the configured limit.'),
    },
  },
  'GET /api/v1/bundles': {
    tags: ['bundles'], summary: 'List bundles, newest version first', security: BEARER,
    response: { 200: arrayOf('Bundles.', schemas.bundleView), ...common },
  },
  'GET /api/v1/bundles/:id/info': {
    tags: ['bundles'], summary: "A bundle's metadata", security: BEARER, params: idParams('bundle'),
    response: { 200: answer('The bundle.', schemas.bundleView), ...common, 404: error('No such bundle.') },
  },
  'GET /api/v1/bundles/:id': {
    tags: ['bundles'], summary: "Download a bundle's bytes (HTTP Range supported)", security: BEARER, params: idParams('bundle'),
    response: {
      200: { description: 'The archive.', content: { 'application/octet-stream': { schema: { type: 'string', format: 'binary' } } } },
      206: { description: 'The requested range.', content: { 'application/octet-stream': { schema: { type: 'string', format: 'binary' } } } },
      302: { description: 'With an S3 backend: a redirect to a short-lived presigned URL.', type: 'null' },
      ...common, 404: error('No such bundle.'), 416: error('The range is outside the bundle.'),
    },
  },

  'POST /api/v1/tokens': {
    tags: ['access'], summary: 'Create an API, integrator or enrollment token (admin)', security: BEARER,
    description: 'The secret is in this answer only; the controller keeps its hash.',
    body: doc(schemas.tokenRequest),
    response: {
      201: { description: 'The token, with its secret.', type: 'object', required: ['id', 'token', 'role', 'name'],
        properties: { id: { type: 'string' }, token: { type: 'string' }, role: { type: 'string' }, name: { type: 'string' },
          expires_at: { type: ['string', 'null'] }, active: { type: 'boolean' } } },
      400: error('Invalid body (unknown role, expiry in the past).'), ...common,
    },
  },
  'GET /api/v1/tokens': {
    tags: ['access'], summary: 'List tokens, without their secrets (admin)', security: BEARER,
    response: { 200: { description: 'Tokens, newest first.', type: 'array', items: { type: 'object' } }, ...common },
  },
  'DELETE /api/v1/tokens/:id': {
    tags: ['access'], summary: 'Revoke a token (admin); its MQTT connections close', security: BEARER, params: idParams('token'),
    response: { 200: { description: 'The revoked token.', type: 'object' }, ...common, 404: error('No such token.') },
  },
  'POST /api/v1/devices/:device_id/revoke': {
    tags: ['access'], summary: 'Revoke a device: its token stops working and its MQTT connection closes at once', security: BEARER,
    params: deviceIdParams,
    response: {
      200: { description: 'Revoked.', type: 'object', properties: { device_id: { type: 'string' }, revoked: { const: true },
        revoked_at: { type: 'string' } } },
      ...common, 404: error('No such device.'),
    },
  },

  'POST /api/v1/deployments': {
    tags: ['deployments'], summary: 'Deploy a bundle (by id or version) to devices', security: BEARER,
    body: doc(schemas.deploymentRequest),
    response: {
      201: answer('The deployment, with each target\'s state.', schemas.deploymentView),
      400: error('Unknown bundle or device, or an invalid body; nothing is created.'), ...common,
    },
  },
  'GET /api/v1/deployments': {
    tags: ['deployments'], summary: 'List deployments and rollbacks, newest first', security: BEARER,
    querystring: {
      type: 'object',
      properties: {
        ...limitQuery(50, 1000).properties,
        running: { enum: ['true', 'false'], description: 'Only those not finished yet (true), or only finished ones (false).' },
      },
    },
    response: { 200: arrayOf('Deployments.', schemas.deploymentView), 400: error('A bad limit.'), ...common },
  },
  'GET /api/v1/deployments/:id': {
    tags: ['deployments'], summary: 'One deployment with each target\'s state', security: BEARER, params: idParams('deployment'),
    response: { 200: answer('The deployment.', schemas.deploymentView), ...common, 404: error('No such deployment.') },
  },
  'POST /api/v1/deployments/:id/result': {
    tags: ['deployments'], summary: 'A device reports the outcome of a deploy or rollback (REST)', security: BEARER,
    description: 'With the device token. The first outcome is recorded; a repeated report answers recorded: false.',
    params: idParams('deployment'), body: doc(schemas.resultRequest),
    response: {
      200: answer('Accepted.', schemas.resultResponse),
      400: error('A status other than success or failed, or an invalid body.'),
      401: common[401],
      403: error('The device is not a target of this deployment, or reports for another device.'),
      404: error('No such deployment.'),
    },
  },
};

const TAGS = [
  { name: 'devices', description: 'Registration, listing, the HTTP heartbeat fallback.' },
  { name: 'configuration', description: 'Per-device configuration, versioned, pushed over MQTT.' },
  { name: 'rollback', description: 'Bundle history and rollback.' },
  { name: 'bundles', description: 'Upload, catalogue, download.' },
  { name: 'deployments', description: 'Deploy bundles and follow their progress; device result reports.' },
  { name: 'health', description: 'Liveness, and the fleet at a glance.' },
];

export async function registerOpenApi(app: FastifyInstance, options: { ui: boolean }): Promise<void> {
  await app.register(swagger, {
    openapi: {
      openapi: '3.1.0',
      info: {
        title: 'Kernex API', version: VERSION,
        description: 'The REST API of the Kernex controller. Authenticate with `Authorization: Bearer <token>`: an API token ' +
          '(viewer, operator, admin) or, for the device routes, the device token from registration. Errors are ' +
          '`{"error": code, "message": text}`. Devices normally hold an MQTT connection (topics under kernex/); the ' +
          'heartbeat and result routes are the HTTP fallback.',
      },
      tags: TAGS,
      components: { securitySchemes: { bearer: { type: 'http', scheme: 'bearer' } } },
    },
    transform: ({ schema, url, route }) => {
      const methods = Array.isArray(route.method) ? route.method : [route.method];
      const documented = ROUTE_DOCS[`${methods[0]} ${url}`];
      return { schema: (documented ?? schema) as typeof schema, url };
    },
  });
  if (options.ui) await app.register(swaggerUi, { routePrefix: '/api/v1/docs' });
  app.get('/api/v1/openapi.json', { schema: { hide: true } }, async () => app.swagger());
}
