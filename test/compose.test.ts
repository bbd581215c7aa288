// docker-compose.yml, checked without Docker (no engine runs on these
// machines): it parses, everything it builds or mounts from the repo exists,
// its images are pinned, and every KERNEX_* variable it sets is one the
// program reads, with values the program accepts.
import { existsSync, readFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { parse } from 'yaml';
import { CONTROLLER_ENV, loadControllerConfig, scaleOutWarnings } from '../controller/index.js';
import { AGENT_ENV, loadAgentConfig } from '../agent/index.js';

interface Service {
  image?: string;
  build?: string | { context: string; dockerfile?: string };
  command?: string[] | string;
  entrypoint?: string[] | string;
  environment?: Record<string, string | number | boolean | null> | string[];
  depends_on?: string[] | Record<string, unknown>;
  volumes?: Array<string | { type: string; source: string }>;
}

const root = resolve('.');
const compose = parse(readFileSync(join(root, 'docker-compose.yml'), 'utf8'), { merge: true }) as {
  services: Record<string, Service>;
  volumes?: Record<string, unknown>;
};
const services = Object.entries(compose.services);

/** What Compose substitutes for `${VAR:-default}` with no .env file: the default. */
const interpolate = (value: string) => value.replace(/\$\{(\w+):-([^}]*)\}/g, (_m, _name, fallback: string) => fallback);

function environment(service: Service): Record<string, string> {
  const env = service.environment ?? {};
  const pairs: Array<[string, string]> = Array.isArray(env)
    ? env.map((e) => e.split('=', 2) as [string, string])
    : Object.entries(env).map(([k, v]) => [k, v === null ? '' : String(v)]);
  return Object.fromEntries(pairs.map(([k, v]) => [k, interpolate(v)]));
}

/** What the service runs: `kernex server`, `kernex agent`, or something else. */
function role(service: Service): 'server' | 'agent' | null {
  if (service.image !== 'kernex:local') return null;
  const words = [service.entrypoint, service.command].flat().filter(Boolean).join(' ');
  if (/kernex\.js agent\b/.test(words)) return 'agent';
  return /(^|\s)server(\s|$)/.test(words) || words === '' ? 'server' : null;
}

test('it parses and has the production-like set of services', () => {
  expect(Object.keys(compose.services).sort()).toEqual(
    ['controller-1', 'controller-2', 'demo-agent', 'lb', 'minio', 'minio-init', 'mongo', 'redis'],
  );
  expect(services.filter(([, s]) => role(s) === 'server').map(([n]) => n)).toEqual(['controller-1', 'controller-2']);
  expect(services.filter(([, s]) => role(s) === 'agent').map(([n]) => n)).toEqual(['demo-agent']);
});

test.each(services)('%s: its build context and files exist, or its image is pinned', (_name, service) => {
  expect(service.build ?? service.image).toBeDefined();
  if (service.build) {
    const build = typeof service.build === 'string' ? { context: service.build } : service.build;
    expect(existsSync(join(root, build.context))).toBe(true);
    expect(existsSync(join(root, build.context, build.dockerfile ?? 'Dockerfile'))).toBe(true);
  }
  if (service.image && !service.build) expect(service.image).toMatch(/^[a-z0-9][a-z0-9._/-]*:[A-Za-z0-9][\w.-]*$/);
  for (const v of service.volumes ?? []) {
    const source = typeof v === 'string' ? v.split(':')[0]! : v.source;
    if (source.startsWith('.') || source.startsWith('/')) expect(existsSync(join(root, source))).toBe(true);
    else expect(Object.keys(compose.volumes ?? {})).toContain(source);
  }
  const deps = Array.isArray(service.depends_on) ? service.depends_on : Object.keys(service.depends_on ?? {});
  for (const d of deps) expect(Object.keys(compose.services)).toContain(d);
});

test.each(services.filter(([, s]) => role(s) === 'server'))('%s: a controller configured for several instances', (_name, service) => {
  const env = environment(service);
  for (const name of Object.keys(env).filter((k) => k.startsWith('KERNEX_'))) expect(CONTROLLER_ENV).toContain(name);
  const config = loadControllerConfig({}, env);
  expect(scaleOutWarnings(config)).toEqual([]);
  expect(config).toEqual(expect.objectContaining({ mongoUrl: expect.any(String), redisUrl: expect.any(String) }));
  expect(config.s3).toEqual(expect.objectContaining({ endPoint: 'minio', port: 9000, bucket: 'kernex-bundles' }));
});

test('the replicas differ only in their instance id', () => {
  const [one, two] = ['controller-1', 'controller-2'].map((n) => environment(compose.services[n]!));
  expect(one!.KERNEX_INSTANCE_ID).not.toBe(two!.KERNEX_INSTANCE_ID);
  expect({ ...one, KERNEX_INSTANCE_ID: '' }).toEqual({ ...two, KERNEX_INSTANCE_ID: '' });
});

test('the demo agent sets only variables the agent reads, and reaches the controllers through the balancer', () => {
  const env = environment(compose.services['demo-agent']!);
  for (const name of Object.keys(env).filter((k) => k.startsWith('KERNEX_'))) expect(AGENT_ENV).toContain(name);
  const config = loadAgentConfig({}, env);
  expect(config.server).toBe('http://lb:8000');
  expect(config.mqttUrl).toBe('mqtt://lb:1883');
  // The enrollment token comes from the controllers' credentials file at start.
  expect([compose.services['demo-agent']!.command].flat().join(' ')).toContain('KERNEX_ENROLLMENT_TOKEN=');
});

test('the balancer forwards MQTT and HTTP to both replicas', () => {
  const cfg = readFileSync(join(root, 'deploy/haproxy.cfg'), 'utf8');
  for (const port of [1883, 8000]) {
    for (const replica of ['controller-1', 'controller-2']) expect(cfg).toContain(`server ${replica} ${replica}:${port}`);
    expect(cfg).toContain(`bind :${port}`);
  }
});

test('the Dockerfile copies only what exists, builds in a separate stage and runs unprivileged', () => {
  const dockerfile = readFileSync(join(root, 'Dockerfile'), 'utf8');
  const sources = [...dockerfile.matchAll(/^COPY (?!--from)(?:--\S+ )*(.+) \S+$/gm)].flatMap((m) => m[1]!.split(/\s+/));
  expect(sources.length).toBeGreaterThan(3);
  for (const source of sources) expect(existsSync(join(root, source))).toBe(true);
  expect(dockerfile.match(/^FROM /gm)).toHaveLength(2);
  expect(dockerfile).toMatch(/^USER node$/m);
  expect(readFileSync(join(root, '.dockerignore'), 'utf8').split('\n')).toEqual(expect.arrayContaining(['node_modules', 'dist']));
});
