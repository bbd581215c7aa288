// The OpenAPI document: served without a token, covering every route with
// the same schemas the handlers validate with; Swagger UI on a real server.
import { spawn } from 'node:child_process';
import { mkdtemp } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { startTestController, waitFor, type TestController } from './support/controller.js';
import { KERNEX_BIN } from './support/agent.js';
import { ROUTE_DOCS, inlineSchema } from '../controller/openapi.js';
import { schemas } from '../schemas/index.js';

let tc: TestController;
let doc: any;

beforeAll(async () => {
  tc = await startTestController();
  const res = await fetch(`${tc.controller.httpUrl}/api/v1/openapi.json`);
  expect(res.status).toBe(200);
  doc = await res.json();
});
afterAll(async () => tc.stop());

const METHODS = ['get', 'put', 'post', 'delete', 'patch'];
const operations = () => Object.entries(doc.paths as Record<string, Record<string, any>>)
  .flatMap(([path, ops]) => Object.entries(ops).filter(([m]) => METHODS.includes(m)).map(([m, op]) => ({ key: `${m.toUpperCase()} ${path}`, op })));

test('an OpenAPI 3.1 document with bearer authentication', () => {
  expect(doc.openapi).toBe('3.1.0');
  expect(doc.info).toMatchObject({ title: 'Kernex API', version: expect.any(String) });
  expect(doc.components.securitySchemes.bearer).toEqual({ type: 'http', scheme: 'bearer' });
});

test('every route is documented with a summary, tags and its responses, and nothing else is listed', () => {
  const documented = Object.keys(ROUTE_DOCS).map((k) => k.replace(/:(\w+)/g, '{$1}')).sort();
  expect(operations().map((o) => o.key).sort()).toEqual(documented);
  for (const { key, op } of operations()) {
    expect({ key, summary: typeof op.summary, tags: op.tags?.length > 0 }).toEqual({ key, summary: 'string', tags: true });
    const codes = Object.keys(op.responses);
    expect({ key, success: codes.some((c) => c.startsWith('2')) }).toEqual({ key, success: true });
  }
  expect(JSON.stringify(doc)).not.toContain('$ref');
});

test('request bodies are the schemas the handlers validate with', () => {
  const body = (key: string) => doc.paths[key.split(' ')[1]!][key.split(' ')[0]!.toLowerCase()].requestBody.content['application/json'].schema;
  expect(body('POST /api/v1/devices/rollback')).toEqual(inlineSchema(schemas.rollbackRequest));
  expect(body('PUT /api/v1/devices/{device_id}/config')).toEqual(inlineSchema(schemas.configUpdate));
  expect(body('POST /api/v1/devices/{device_id}/heartbeat')).toEqual(inlineSchema(schemas.heartbeat));
  expect(body('POST /api/v1/deployments/{id}/result')).toEqual(inlineSchema(schemas.resultRequest));
  expect(body('POST /api/v1/devices/register').properties.device_id.pattern).toBe(schemas.common.$defs.deviceId.pattern);
  const upload = doc.paths['/api/v1/bundles'].post.requestBody.content;
  expect(Object.keys(upload)).toEqual(['multipart/form-data']);
});

test('parameters and answers are described', () => {
  const history = doc.paths['/api/v1/devices/{device_id}/bundle-history'].get;
  expect(history.parameters).toEqual(expect.arrayContaining([
    expect.objectContaining({ in: 'path', name: 'device_id', required: true }),
    expect.objectContaining({ in: 'query', name: 'limit', schema: expect.objectContaining({ maximum: 100, default: 20 }) }),
  ]));
  const entry = history.responses['200'].content['application/json'].schema.items;
  expect(entry.required).toEqual(expect.arrayContaining(['id', 'device_id', 'bundle_version', 'bundle_id', 'deployment_id',
    'status', 'error_message', 'deployed_at', 'duration_seconds']));
  expect(entry.properties.status.enum).toEqual(['success', 'failed', 'rolled_back']);
  const rollback = doc.paths['/api/v1/devices/rollback'].post.responses;
  expect(Object.keys(rollback)).toEqual(expect.arrayContaining(['201', '400', '401', '403']));
  expect(rollback['400'].description).toMatch(/no_successful_deployment/);
  const heartbeat = doc.paths['/api/v1/devices/{device_id}/heartbeat'].post.responses['200'].content['application/json'].schema;
  expect(heartbeat.properties.commands.items.oneOf).toHaveLength(2);
});

test('a real `kernex server` serves Swagger UI and the document', async () => {
  const dataDir = await mkdtemp(join(tmpdir(), 'kernex-docs-'));
  const child = spawn(process.execPath, [KERNEX_BIN, 'server', '--data-dir', dataDir, '--http-port', '0', '--mqtt-port', '0',
    '--host', '127.0.0.1'], { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, KERNEX_LOG_JSON: '1' } });
  let out = '';
  child.stdout.on('data', (d: Buffer) => (out += d.toString()));
  child.stderr.on('data', (d: Buffer) => (out += d.toString()));
  try {
    const http = await waitFor(() => /"http":"(http:\/\/[^"]+)"/.exec(out)?.[1], 'the server to listen', 20_000)
      .catch((err: Error) => {
        throw new Error(`${err.message}\n${out}`);
      });
    const ui = await fetch(`${http}/api/v1/docs/`);
    expect(ui.status).toBe(200);
    expect(await ui.text()).toContain('swagger-ui');
    const served = await (await fetch(`${http}/api/v1/openapi.json`)).json();
    expect(Object.keys(served.paths)).toEqual(Object.keys(doc.paths));
    expect(served.paths['/api/v1/docs']).toBeUndefined();
  } finally {
    child.kill('SIGTERM');
    await new Promise((r) => child.once('exit', r));
  }
});
