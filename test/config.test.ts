// The controller's configuration: what each KERNEX_* setting turns into, and
// the message an operator gets when one is wrong (never with a secret in it).
import { hostname } from 'node:os';
import { loadControllerConfig, ConfigError, CONTROLLER_ENV, scaleOutWarnings } from '../controller/index.js';
import { AGENT_ENV } from '../agent/index.js';

const load = (env: Record<string, string>) => loadControllerConfig({}, env);
const refusal = (env: Record<string, string>) => {
  try {
    load(env);
  } catch (err) {
    expect(err).toBeInstanceOf(ConfigError);
    return (err as Error).message;
  }
  throw new Error('the configuration was accepted');
};

const s3Vars = {
  KERNEX_S3_ENDPOINT: 'minio:9000', KERNEX_S3_ACCESS_KEY: 'kernex', KERNEX_S3_SECRET_KEY: 's3cret/key', KERNEX_S3_BUCKET: 'kernex-bundles',
};

describe('S3', () => {
  test('from the separate variables', () => {
    expect(load({ ...s3Vars, KERNEX_S3_REGION: 'eu-west-1', KERNEX_S3_PUBLIC_URL: 'https://s3.example.com' }).s3).toEqual({
      endPoint: 'minio', port: 9000, useSSL: false, accessKey: 'kernex', secretKey: 's3cret/key', bucket: 'kernex-bundles',
      region: 'eu-west-1', publicUrl: 'https://s3.example.com',
    });
    expect(load({ ...s3Vars, KERNEX_S3_ENDPOINT: 'https://s3.example.com' }).s3).toEqual(
      expect.objectContaining({ endPoint: 's3.example.com', useSSL: true }),
    );
    expect(load({ ...s3Vars, KERNEX_S3_USE_SSL: 'true' }).s3?.useSSL).toBe(true);
  });

  test('from one URL', () => {
    expect(load({ KERNEX_S3_URL: 's3://kernex:s3cret%2Fkey@minio:9000/kernex-bundles?ssl=false' }).s3).toEqual(
      expect.objectContaining({ endPoint: 'minio', port: 9000, useSSL: false, secretKey: 's3cret/key', bucket: 'kernex-bundles' }),
    );
  });

  test('none of it: bundles stay on disk', () => {
    expect(load({}).s3).toBeUndefined();
  });

  test('wrong or incomplete settings are refused with what to fix, never quoting the secret', () => {
    expect(refusal({ KERNEX_S3_ENDPOINT: 'minio:9000', KERNEX_S3_SECRET_KEY: 'hidden' }))
      .toBe('S3 is partly configured (KERNEX_S3_ENDPOINT, KERNEX_S3_SECRET_KEY): KERNEX_S3_ACCESS_KEY, KERNEX_S3_BUCKET missing');
    expect(refusal({ ...s3Vars, KERNEX_S3_URL: 's3://a:b@h/bucket' })).toContain('set either KERNEX_S3_URL or');
    expect(refusal({ KERNEX_S3_URL: 's3://kernex:hidden@minio:9000/Bad_Bucket' })).not.toContain('hidden');
    expect(refusal({ KERNEX_S3_URL: 'http://kernex:hidden@minio:9000/b' })).toMatch(/^KERNEX_S3_URL: /);
    expect(refusal({ ...s3Vars, KERNEX_S3_BUCKET: 'Bundles' })).toContain('is not a bucket name');
    expect(refusal({ ...s3Vars, KERNEX_S3_USE_SSL: 'maybe' })).toBe("KERNEX_S3_USE_SSL must be true or false, got 'maybe'");
    expect(refusal({ ...s3Vars, KERNEX_S3_PUBLIC_URL: 'https://cdn.example.com/bundles' })).toContain('with nothing after it');
    expect(refusal({ KERNEX_S3_PUBLIC_URL: 'https://s3.example.com' })).toContain('KERNEX_S3_PUBLIC_URL is set but S3 is not');
  });
});

describe('Redis and MongoDB', () => {
  test('URLs are checked, and a password never appears in the message', () => {
    expect(load({ KERNEX_REDIS_URL: 'redis://:pw@redis:6379/2' }).redisUrl).toBe('redis://:pw@redis:6379/2');
    expect(refusal({ KERNEX_REDIS_URL: 'http://redis:6379' })).toBe("KERNEX_REDIS_URL must use redis: or rediss:, got 'http:'");
    const message = refusal({ KERNEX_MONGO_URL: 'mongodb://user:hidden@mongo:27017:27018/x y' });
    expect(message).toContain('KERNEX_MONGO_URL is not a valid URL');
    expect(message).not.toContain('hidden');
  });

  test('settings that cannot work for several instances are named at start-up', () => {
    const all = load({ KERNEX_REDIS_URL: 'redis://r:6379', KERNEX_MONGO_URL: 'mongodb://m/kernex', ...s3Vars });
    expect(scaleOutWarnings(all)).toEqual([]);
    expect(scaleOutWarnings(load({}))).toEqual([]);
    expect(scaleOutWarnings(load({ KERNEX_REDIS_URL: 'redis://r:6379' }))).toEqual([expect.stringContaining('KERNEX_MONGO_URL')]);
    expect(scaleOutWarnings(load({ KERNEX_MONGO_URL: 'mongodb://m/kernex' }))).toHaveLength(2);
  });
});

describe('instance id', () => {
  test('defaults to host and MQTT port, or is given', () => {
    expect(load({}).instanceId).toBe(`${hostname()}:1883`);
    expect(load({ KERNEX_MQTT_PORT: '1884' }).instanceId).toBe(`${hostname()}:1884`);
    expect(load({ KERNEX_INSTANCE_ID: 'controller-2' }).instanceId).toBe('controller-2');
    expect(load({ KERNEX_MQTT_PORT: '0' }).instanceId).not.toBe(load({ KERNEX_MQTT_PORT: '0' }).instanceId);
    expect(refusal({ KERNEX_INSTANCE_ID: 'a/b' })).toContain("KERNEX_INSTANCE_ID 'a/b' is invalid");
  });
});

test('every KERNEX_* variable the controller reads is listed in CONTROLLER_ENV', async () => {
  const { readFile } = await import('node:fs/promises');
  const source = await readFile(new URL('../controller/config.ts', import.meta.url), 'utf8');
  const read = new Set([...source.matchAll(/env\.(KERNEX_[A-Z0-9_]+)/g)].map((m) => m[1]));
  for (const name of read) expect(CONTROLLER_ENV).toContain(name);
});

test('the README documents every KERNEX_* variable the controller and the agent read', async () => {
  const { readFile } = await import('node:fs/promises');
  const readme = await readFile(new URL('../README.md', import.meta.url), 'utf8');
  for (const name of [...CONTROLLER_ENV, ...AGENT_ENV, 'KERNEX_LOG_JSON']) expect(readme).toContain(`\`${name}\``);
});
