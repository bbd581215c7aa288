// The S3 backend against a real S3 HTTP server on loopback: s3rver, in-process.
//
// s3rver 3.7.1 differs from real S3 in ways that matter here (pinned by the
// "s3rver deviations" tests below; if one fails after an upgrade, the
// deviation is gone: drop the test and its note):
// - It does not verify SigV4 signatures at all (header or presigned query), only
//   the access key id and the expiry. The presigned-URL tests therefore prove
//   the URL's shape, path, expiry and Range handling, not its signature.
// - `Range: bytes=0-0` gets the whole object (its store treats end 0 as "no
//   end"), and suffix ranges (`bytes=-N`) are read as `bytes=0-N`. The store's
//   get() returns exactly the requested bytes anyway (see exactRange in s3.ts).
// - No AbortMultipartUpload (MethodNotAllowed) and no ListMultipartUploads
//   (NotImplemented): parts of an aborted upload stay in its directory until
//   the server resets. Real S3 frees them on abort.
import { mkdtemp, rm } from 'node:fs/promises';
import type { AddressInfo } from 'node:net';
import { createRequire } from 'node:module';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { jest } from '@jest/globals';
import {
  BlobTooLargeError,
  openBlobStore,
  parseS3Url,
  type BlobStore,
  type S3Config,
} from '../controller/blobs/index.js';
import { createS3BlobStore } from '../controller/blobs/s3.js';
import { blobContract } from './blobs.contract.js';

// s3rver ships no types: this is the part of its API used here.
interface S3rverOptions {
  port: number;
  address: string;
  silent: boolean;
  directory: string;
  resetOnClose: boolean;
}
interface S3rverServer {
  run(): Promise<AddressInfo>;
  close(): Promise<void>;
}
const S3rver = createRequire(import.meta.url)('s3rver') as new (options: S3rverOptions) => S3rverServer;

const MiB = 1024 * 1024;

/** A fresh s3rver on an ephemeral loopback port, and a config pointing at it. */
async function startS3(): Promise<{ config: S3Config; stop: () => Promise<void> }> {
  const directory = await mkdtemp(join(tmpdir(), 'kernex-s3rver-'));
  const server = new S3rver({ port: 0, address: '127.0.0.1', silent: true, directory, resetOnClose: true });
  const { port } = await server.run();
  return {
    config: {
      endPoint: '127.0.0.1',
      port,
      useSSL: false,
      accessKey: 'S3RVER',
      secretKey: 'S3RVER',
      bucket: 'kernex-test',
      region: 'us-east-1',
      // The S3 minimum, so the contract's 12 MiB blob is a 3-part upload.
      partSize: 5 * MiB,
    },
    stop: async () => {
      await server.close();
      await rm(directory, { recursive: true, force: true });
    },
  };
}

let contractS3: Awaited<ReturnType<typeof startS3>> | undefined;
blobContract(
  's3 (s3rver)',
  async () => {
    contractS3 = await startS3();
    return createS3BlobStore(contractS3.config);
  },
  async () => contractS3?.stop(),
);

describe('S3 blob store', () => {
  let s3: Awaited<ReturnType<typeof startS3>>;
  let store: BlobStore;
  beforeAll(async () => {
    s3 = await startS3();
    store = await openBlobStore({ dataDir: '/nonexistent', s3: s3.config });
  });
  afterAll(async () => {
    await store.close();
    await s3.stop();
  });

  test('openBlobStore with s3 creates the bucket, and opening it again is fine', async () => {
    await store.put('b1', Readable.from([Buffer.from('hello')]));
    // No region this time: the client asks the server for the bucket's.
    const again = await openBlobStore({ dataDir: '/nonexistent', s3: { ...s3.config, region: undefined } });
    expect((await again.stat('b1'))?.size).toBe(5);
    await again.close();
  });

  test('presigned URLs are signed for publicUrl when one is configured', async () => {
    const publicUrl = 'https://downloads.example.com';
    const pub = await createS3BlobStore({ ...s3.config, region: undefined, publicUrl });
    const url = new URL((await pub.downloadUrl('b1', 300))!);
    expect(url.origin).toBe('https://downloads.example.com');
    expect(url.pathname).toBe('/kernex-test/b1');
    expect(url.searchParams.get('X-Amz-Expires')).toBe('300');
    expect(url.searchParams.get('X-Amz-Signature')).toMatch(/^[0-9a-f]{64}$/);
    // The region came from the internal endpoint (s3rver reports us-east-1).
    expect(url.searchParams.get('X-Amz-Credential')).toMatch(/\/us-east-1\/s3\/aws4_request$/);
    await pub.close();
  });

  test('bad configuration is refused at start-up', async () => {
    await expect(createS3BlobStore({ ...s3.config, partSize: MiB })).rejects.toThrow(/partSize/);
    await expect(createS3BlobStore({ ...s3.config, publicUrl: 'https://cdn.example.com/s3' })).rejects.toThrow(
      /publicUrl/,
    );
  });

  test('small blobs are one PutObject; big ones a multipart upload, aborted on failure', async () => {
    const { Client } = await import('minio');
    const putObject = jest.spyOn(Client.prototype, 'putObject');
    const uploadPart = jest.spyOn(Client.prototype, 'uploadPart');
    const complete = jest.spyOn(Client.prototype, 'completeMultipartUpload');
    const abort = jest.spyOn(Client.prototype, 'abortMultipartUpload');
    try {
      await store.put('small', Readable.from([Buffer.alloc(5 * MiB - 1)]));
      expect([putObject.mock.calls.length, uploadPart.mock.calls.length]).toEqual([1, 0]);

      // Parts are cut at the first chunk boundary past partSize (5 MiB here): 8 + 4 MiB.
      const fourMiB = Buffer.alloc(4 * MiB);
      const big = await store.put('big', Readable.from([fourMiB, fourMiB, fourMiB]));
      expect(big.size).toBe(12 * MiB);
      expect(uploadPart.mock.calls.map((call) => call[0].partNumber)).toEqual([1, 2]);
      expect(complete.mock.calls.length).toBe(1);
      expect(putObject.mock.calls.length).toBe(1);

      await expect(
        store.put('too-big', Readable.from([Buffer.alloc(6 * MiB), Buffer.alloc(6 * MiB)]), { maxBytes: 10 * MiB }),
      ).rejects.toBeInstanceOf(BlobTooLargeError);
      expect(abort.mock.calls.map((call) => call[1])).toEqual(['too-big']);
      expect(await store.stat('too-big')).toBeNull();
    } finally {
      jest.restoreAllMocks();
    }
  });

  test('downloadUrl refuses TTLs S3 would refuse', async () => {
    await expect(store.downloadUrl('b1', 0)).rejects.toBeInstanceOf(RangeError);
    await expect(store.downloadUrl('b1', 8 * 24 * 3600)).rejects.toBeInstanceOf(RangeError);
  });

  describe('s3rver deviations from S3 (documented, not relied on)', () => {
    test('Range: bytes=0-0 returns the whole object, yet get() returns one byte', async () => {
      await store.put('quirk', Readable.from([Buffer.from('0123456789')]));
      const url = (await store.downloadUrl('quirk', 60))!;
      const res = await fetch(url, { headers: { Range: 'bytes=0-0' } });
      expect(await res.text()).toBe('0123456789'); // real S3: "0"
      const one: Buffer[] = [];
      for await (const chunk of await store.get('quirk', { start: 0, end: 0 })) one.push(chunk as Buffer);
      expect(Buffer.concat(one).toString()).toBe('0');
    });

    test('a suffix range bytes=-N is read as bytes=0-N', async () => {
      const url = (await store.downloadUrl('quirk', 60))!;
      const res = await fetch(url, { headers: { Range: 'bytes=-3' } });
      expect(await res.text()).toBe('0123'); // real S3: "789"
    });

    test('a presigned URL with a forged signature is accepted', async () => {
      const url = new URL((await store.downloadUrl('quirk', 60))!);
      url.searchParams.set('X-Amz-Signature', '0'.repeat(64));
      expect((await fetch(url)).status).toBe(200); // real S3: 403 SignatureDoesNotMatch
    });

    test('an expired presigned URL is refused, as on S3', async () => {
      const url = new URL((await store.downloadUrl('quirk', 60))!);
      url.searchParams.set('X-Amz-Date', '20200101T000000Z');
      expect((await fetch(url)).status).toBe(403);
    });
  });
});

describe('parseS3Url', () => {
  test('reads every part of the URL', () => {
    expect(parseS3Url('s3://AKIA:s%2Fecret%40x@minio.local:9000/kernex-bundles?ssl=false&region=eu-west-1')).toEqual({
      endPoint: 'minio.local',
      port: 9000,
      useSSL: false,
      accessKey: 'AKIA',
      secretKey: 's/ecret@x',
      bucket: 'kernex-bundles',
      region: 'eu-west-1',
    });
  });

  test('defaults: TLS on, default port, no region', () => {
    expect(parseS3Url('s3://a:b@s3.example.com/bundles')).toEqual({
      endPoint: 's3.example.com',
      useSSL: true,
      accessKey: 'a',
      secretKey: 'b',
      bucket: 'bundles',
    });
  });

  test('public_url and IPv6 hosts', () => {
    const config = parseS3Url(
      `s3://a:b@[::1]:9000/bundles?public_url=${encodeURIComponent('https://dl.example.com:8443')}`,
    );
    expect(config.endPoint).toBe('::1');
    expect(config.publicUrl).toBe('https://dl.example.com:8443');
  });

  test.each([
    ['not a URL', 'minio:9000/bucket'],
    ['another scheme', 'http://a:b@host/bucket'],
    ['no credentials', 's3://host/bucket'],
    ['no secret', 's3://a@host/bucket'],
    ['no bucket', 's3://a:b@host/'],
    ['a nested path', 's3://a:b@host/bucket/dir'],
    ['an invalid bucket', 's3://a:b@host/Bucket_1'],
    ['a bad ssl flag', 's3://a:b@host/bucket?ssl=no'],
    ['an unknown parameter', 's3://a:b@host/bucket?sll=false'],
    ['a public_url with a path', `s3://a:b@host/bucket?public_url=${encodeURIComponent('https://x/y')}`],
  ])('refuses %s, without echoing the secret', (_what, url) => {
    const secretized = url.replace(':b@', ':TOPSECRET@');
    expect(() => parseS3Url(secretized)).toThrow(/S3 URL|publicUrl/);
    try {
      parseS3Url(secretized);
    } catch (err) {
      expect(String((err as Error).message)).not.toContain('TOPSECRET');
    }
  });
});
