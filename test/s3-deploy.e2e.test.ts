// The controller with its bundles in S3 (s3rver on loopback) and a real
// agent: the device downloads through a presigned redirect, from the S3 host
// it is told to use (KERNEX_S3_PUBLIC_URL), without its token.
import { createServer, request, type IncomingHttpHeaders, type Server } from 'node:http';
import { createRequire } from 'node:module';
import { mkdtemp, readFile, readdir } from 'node:fs/promises';
import type { AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { loadControllerConfig } from '../controller/index.js';
import { startTestController, waitFor, type TestController } from './support/controller.js';
import { startAgentProcess, type AgentProcess } from './support/agent.js';
import { packBundle, scriptBundle } from './support/bundles.js';

// s3rver ships no types: the part of its API used here.
interface S3rverServer {
  run(): Promise<AddressInfo>;
  close(): Promise<void>;
}
const S3rver = createRequire(import.meta.url)('s3rver') as new (options: Record<string, unknown>) => S3rverServer;

describe('bundles in S3, downloaded by devices through presigned redirects', () => {
  let s3: S3rverServer;
  let s3Port: number;
  let publicS3: Server;
  let tc: TestController;
  let agent: AgentProcess;
  const seenByS3: Array<{ method: string; url: string; headers: IncomingHttpHeaders }> = [];

  beforeAll(async () => {
    const dir = await mkdtemp(join(tmpdir(), 'kernex-s3rver-'));
    s3 = new S3rver({ port: 0, address: '127.0.0.1', silent: true, directory: dir, resetOnClose: true });
    s3Port = (await s3.run()).port;
    // The address devices use for S3 (another host name than the controller's),
    // recording what reaches it.
    publicS3 = createServer((req, res) => {
      seenByS3.push({ method: req.method!, url: req.url!, headers: req.headers });
      const upstream = request({ host: '127.0.0.1', port: s3Port, method: req.method, path: req.url, headers: req.headers }, (r) => {
        res.writeHead(r.statusCode!, r.headers);
        r.pipe(res);
      });
      upstream.on('error', () => res.destroy());
      req.pipe(upstream);
    });
    await new Promise<void>((r) => publicS3.listen(0, '127.0.0.1', r));
    const publicPort = (publicS3.address() as AddressInfo).port;

    // Configured as an operator would: environment variables.
    const { s3: settings } = loadControllerConfig({}, {
      KERNEX_S3_ENDPOINT: `http://127.0.0.1:${s3Port}`, KERNEX_S3_ACCESS_KEY: 'S3RVER', KERNEX_S3_SECRET_KEY: 'S3RVER',
      KERNEX_S3_BUCKET: 'kernex-bundles', KERNEX_S3_REGION: 'us-east-1', KERNEX_S3_PUBLIC_URL: `http://localhost:${publicPort}`,
    });
    tc = await startTestController({ s3: settings });
  });

  afterAll(async () => {
    await agent?.stop();
    await tc?.stop();
    await new Promise<void>((r) => publicS3.close(() => r()));
    await s3?.close();
  });

  test('a real agent deploys a bundle stored in S3; the controller never serves its bytes', async () => {
    const out = join(await mkdtemp(join(tmpdir(), 'kernex-s3e2e-')), 'deploy.out');
    const uploaded = await tc.api.upload(await packBundle(scriptBundle('4.0.0', out)));
    expect(uploaded.status).toBe(201);
    // Nothing on the controller's disk: the bundle went to the bucket.
    expect(await readdir(tc.dataDir)).not.toContain('blobs');

    agent = await startAgentProcess({ deviceId: 'dev-s3', server: tc.controller.httpUrl, enrollmentToken: tc.creds.enrollment_token });
    await waitFor(async () => (await tc.api.get('/devices/dev-s3')).body.status === 'online', 'dev-s3 online');
    const created = await tc.api.post('/deployments', { bundle_version: '4.0.0', target_device_ids: ['dev-s3'] });
    expect(created.status).toBe(201);
    const dep = await waitFor(async () => {
      const d = (await tc.api.get(`/deployments/${created.body.deployment_id}`)).body;
      return d.finished_at ? d : null;
    }, 'the deployment to finish', 30_000).catch((err: Error) => {
      throw new Error(`${err.message}\nagent output:\n${agent.output()}`);
    });
    expect(dep.status).toBe('success');
    expect(await readFile(out, 'utf8')).toBe('deploy 4.0.0\n');

    // The device fetched the object from the public S3 address, signed, without its token.
    const gets = seenByS3.filter((r) => r.method === 'GET' && r.url.startsWith(`/kernex-bundles/${uploaded.body.id}`));
    expect(gets.length).toBeGreaterThanOrEqual(1);
    for (const g of gets) {
      expect(g.url).toContain('X-Amz-Signature=');
      expect(g.headers.authorization).toBeUndefined();
    }

    // What the device got from the controller: a short-lived redirect, no bytes.
    const token = JSON.parse(await readFile(join(agent.dataDir, 'state.json'), 'utf8')).token as string;
    const res = await fetch(`${tc.controller.httpUrl}/api/v1/bundles/${uploaded.body.id}`, {
      headers: { authorization: `Bearer ${token}` }, redirect: 'manual',
    });
    expect(res.status).toBe(302);
    const location = new URL(res.headers.get('location')!);
    expect(location.host).toBe(`localhost:${(publicS3.address() as AddressInfo).port}`);
    expect(Number(location.searchParams.get('X-Amz-Expires'))).toBeGreaterThan(0);
    expect(await res.text()).toBe('');
  });
});
