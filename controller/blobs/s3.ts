// S3 / MinIO backend through the `minio` client. `minio` is imported lazily
// (only the types statically), so the embedded filesystem mode never loads it.
import { createHash } from 'node:crypto';
import http, { IncomingMessage } from 'node:http';
import https from 'node:https';
import { Readable } from 'node:stream';
import type { Client } from 'minio';
import {
  BlobNotFoundError,
  BlobRangeError,
  PutMeter,
  assertBlobKey,
  assertByteRange,
  type BlobInfo,
  type BlobStore,
  type ByteRange,
  type PutOptions,
} from './port.js';

export interface S3Config {
  endPoint: string;
  port?: number;
  /** Default true. */
  useSSL?: boolean;
  accessKey: string;
  secretKey: string;
  bucket: string;
  region?: string;
  /**
   * `scheme://host[:port]` under which devices reach the same S3 service when
   * it differs from `endPoint` (e.g. the controller talks to `minio:9000` on a
   * private network). Presigned URLs are signed for this host.
   */
  publicUrl?: string;
  /** Bytes buffered per multipart part; default 16 MiB, at least 5 MiB (the S3 minimum). */
  partSize?: number;
}

const MiB = 1024 * 1024;
const DEFAULT_PART_SIZE = 16 * MiB;
const MIN_PART_SIZE = 5 * MiB;
// S3 refuses presigned URLs valid for longer than 7 days.
const MAX_PRESIGN_SECONDS = 7 * 24 * 3600;
const CONTENT_TYPE = 'application/octet-stream';

export async function createS3BlobStore(config: S3Config): Promise<BlobStore> {
  const partSize = config.partSize ?? DEFAULT_PART_SIZE;
  if (!Number.isSafeInteger(partSize) || partSize < MIN_PART_SIZE) {
    throw new RangeError(`S3 partSize must be an integer of at least ${MIN_PART_SIZE} bytes`);
  }
  const publicEndpoint = config.publicUrl === undefined ? null : parsePublicUrl(config.publicUrl);

  const { Client, S3Error } = await import('minio');
  const useSSL = config.useSSL ?? true;
  // Our own keep-alive agent, so close() can release its sockets.
  const agent = useSSL ? new https.Agent({ keepAlive: true }) : new http.Agent({ keepAlive: true });
  const client = new Client({
    endPoint: config.endPoint,
    port: config.port,
    useSSL,
    accessKey: config.accessKey,
    secretKey: config.secretKey,
    region: config.region,
    transportAgent: agent,
  });
  const { bucket } = config;

  let presigner: Client = client;
  try {
    await ensureBucket(client, bucket, config.region);
    if (publicEndpoint) {
      // Presigning is local computation once the region is known, so the
      // client for the public host never needs to reach it (the controller
      // may well be unable to): the region is asked of the internal endpoint.
      presigner = new Client({
        ...publicEndpoint,
        accessKey: config.accessKey,
        secretKey: config.secretKey,
        region: config.region ?? (await client.getBucketRegionAsync(bucket)),
        transportAgent: agent,
      });
    }
  } catch (err) {
    agent.destroy();
    throw err;
  }

  return {
    async put(key: string, data: Readable, options: PutOptions = {}): Promise<BlobInfo> {
      try {
        assertBlobKey(key);
        const meter = new PutMeter(options.maxBytes);
        const upload = new ObjectUpload(client, bucket, key, partSize);
        try {
          // Throwing out of this loop (limit exceeded, part upload failed)
          // destroys `data`, so the rest of an oversized upload is never read.
          for await (const chunk of data) await upload.write(meter.add(chunk));
          await upload.commit();
        } catch (err) {
          // An S3Error is the server's answer, so a failed final request was
          // not applied; anything else (a lost connection) leaves it unknown.
          await upload.discard({ outcomeUnknown: !(err instanceof S3Error) });
          throw err;
        }
        return meter.result();
      } catch (err) {
        // put owns `data`: a refused upload must not keep its sender streaming.
        data.destroy();
        throw err;
      }
    },

    async get(key: string, range?: ByteRange) {
      assertBlobKey(key);
      if (range) assertByteRange(range);
      try {
        if (!range) return await client.getObject(bucket, key);
        const length = range.end - range.start + 1;
        return exactRange(await client.getPartialObject(bucket, key, range.start, length), key, range);
      } catch (err) {
        const code = s3Code(err);
        if (code === 'NoSuchKey' || code === 'NotFound') throw new BlobNotFoundError(key);
        if (code === 'InvalidRange' && range) throw new BlobRangeError(key, range);
        throw err;
      }
    },

    async stat(key: string) {
      assertBlobKey(key);
      try {
        return { size: (await client.statObject(bucket, key)).size };
      } catch (err) {
        const code = s3Code(err);
        if (code === 'NotFound' || code === 'NoSuchKey') return null;
        throw err;
      }
    },

    async delete(key: string) {
      assertBlobKey(key);
      try {
        await client.removeObject(bucket, key);
      } catch (err) {
        // S3 answers 204 for an absent key anyway; some compatibles do not.
        if (s3Code(err) !== 'NoSuchKey') throw err;
      }
    },

    async downloadUrl(key: string, ttlSeconds: number) {
      assertBlobKey(key);
      if (!Number.isSafeInteger(ttlSeconds) || ttlSeconds < 1 || ttlSeconds > MAX_PRESIGN_SECONDS) {
        throw new RangeError(`ttlSeconds must be an integer from 1 to ${MAX_PRESIGN_SECONDS}`);
      }
      // Signed locally (no request once the region is known), so this says
      // nothing about whether the object exists.
      return presigner.presignedGetObject(bucket, key, ttlSeconds);
    },

    async close() {
      agent.destroy();
    },
  };
}

async function ensureBucket(client: Client, bucket: string, region: string | undefined) {
  if (await client.bucketExists(bucket)) return;
  try {
    await client.makeBucket(bucket, region ?? '');
  } catch (err) {
    // Several controllers may start at once: losing that race is fine.
    if (!(await client.bucketExists(bucket))) throw err;
  }
}

/**
 * One object being written, streaming: bytes are buffered up to one part; an
 * upload that fits in one part is a single PutObject, a larger one a multipart
 * upload. Either way S3 makes the object visible only at the final request
 * (PutObject or CompleteMultipartUpload), so an aborted upload shows nothing.
 *
 * minio's own putObject is not used for streams: with an unknown size it
 * buffers ~500 MiB parts, never settles when its source errors (it pipes
 * without forwarding the error), and resumes whatever incomplete upload it
 * finds for the same key.
 */
class ObjectUpload {
  private pending: Buffer[] = [];
  private pendingBytes = 0;
  private uploadId: string | undefined;
  private readonly parts: { part: number; etag: string }[] = [];
  private committing = false;

  constructor(
    private readonly client: Client,
    private readonly bucket: string,
    private readonly key: string,
    private readonly partSize: number,
  ) {}

  async write(bytes: Buffer): Promise<void> {
    this.pending.push(bytes);
    this.pendingBytes += bytes.length;
    if (this.pendingBytes >= this.partSize) await this.flushPart();
  }

  async commit(): Promise<void> {
    if (this.uploadId === undefined) {
      this.committing = true;
      await this.client.putObject(this.bucket, this.key, this.takePending(), undefined, {
        'Content-Type': CONTENT_TYPE,
      });
      return;
    }
    if (this.pendingBytes > 0) await this.flushPart();
    this.committing = true;
    await this.client.completeMultipartUpload(this.bucket, this.key, this.uploadId, this.parts);
  }

  /** Best effort: the caller is already failing with the error that matters. */
  async discard({ outcomeUnknown }: { outcomeUnknown: boolean }): Promise<void> {
    if (this.uploadId !== undefined) {
      // Frees the parts stored so far. s3rver does not implement
      // AbortMultipartUpload (it answers MethodNotAllowed); on real S3 a
      // bucket lifecycle rule (AbortIncompleteMultipartUpload) is the backstop.
      await this.client.abortMultipartUpload(this.bucket, this.key, this.uploadId).catch(() => undefined);
    }
    if (this.committing && outcomeUnknown) {
      // The final request got no answer (e.g. the connection dropped), so it
      // may have been applied: remove the object rather than leave a blob whose
      // put was reported failed. The price, only in this case, is that an
      // earlier blob under the same key may go too; bundle keys are unique ids.
      await this.client.removeObject(this.bucket, this.key).catch(() => undefined);
    }
  }

  private async flushPart(): Promise<void> {
    const body = this.takePending();
    this.uploadId ??= await this.client.initiateNewMultipartUpload(this.bucket, this.key, {
      'Content-Type': CONTENT_TYPE,
    });
    const part = this.parts.length + 1;
    // Over HTTPS minio sends parts with UNSIGNED-PAYLOAD: Content-MD5 is then
    // what lets S3 detect a part corrupted in transit.
    const { etag } = await this.client.uploadPart(
      {
        bucketName: this.bucket,
        objectName: this.key,
        uploadID: this.uploadId,
        partNumber: part,
        headers: { 'Content-MD5': createHash('md5').update(body).digest('base64') },
      },
      body,
    );
    this.parts.push({ part, etag });
  }

  private takePending(): Buffer {
    const body = Buffer.concat(this.pending, this.pendingBytes);
    this.pending = [];
    this.pendingBytes = 0;
    return body;
  }
}

/**
 * Makes a ranged read return exactly the requested bytes. HTTP lets a server
 * ignore Range (200 with the whole body), and s3rver widens `bytes=0-0` to the
 * whole object (a 206 over every byte); real S3 and MinIO answer exactly, and
 * then the response is returned untouched.
 */
function exactRange(res: Readable, key: string, range: ByteRange): Readable {
  if (!(res instanceof IncomingMessage)) return res;
  const length = range.end - range.start + 1;
  if (res.statusCode === 206) {
    const served = parseContentRange(res.headers['content-range']);
    if (served === null || served.start !== range.start) {
      res.destroy();
      throw new Error(
        `S3 answered range ${range.start}-${range.end} of ${key} with ` +
          `Content-Range ${res.headers['content-range'] ?? '(none)'}`,
      );
    }
    if (served.end <= range.end) return res;
    return Readable.from(slice(res, 0, length), { objectMode: false });
  }
  const size = Number(res.headers['content-length']);
  if (Number.isSafeInteger(size) && range.start >= size) {
    res.destroy();
    throw new BlobRangeError(key, range);
  }
  return Readable.from(slice(res, range.start, length), { objectMode: false });
}

function parseContentRange(header: string | undefined): { start: number; end: number } | null {
  const match = /^bytes (\d+)-(\d+)\/(?:\d+|\*)$/.exec(header ?? '');
  return match ? { start: Number(match[1]), end: Number(match[2]) } : null;
}

/** Skips `skip` bytes, yields the next `length`, then stops (destroying `source`). */
async function* slice(source: Readable, skip: number, length: number): AsyncGenerator<Buffer> {
  for await (const chunk of source) {
    let bytes = Buffer.isBuffer(chunk) ? chunk : Buffer.from(chunk as Uint8Array);
    if (skip >= bytes.length) {
      skip -= bytes.length;
      continue;
    }
    bytes = bytes.subarray(skip);
    skip = 0;
    if (bytes.length >= length) {
      yield bytes.subarray(0, length);
      return;
    }
    length -= bytes.length;
    yield bytes;
  }
}

// Structural, not `instanceof Error`: errors can come from another realm
// (jest's VM sandbox, worker threads) where that check is false.
function s3Code(err: unknown): string | undefined {
  return typeof err === 'object' && err !== null && 'code' in err && typeof err.code === 'string'
    ? err.code
    : undefined;
}

function parsePublicUrl(raw: string): { endPoint: string; port?: number; useSSL: boolean } {
  let url: URL;
  try {
    url = new URL(raw);
  } catch {
    throw new Error(`S3 publicUrl ${JSON.stringify(raw)} is not a URL`);
  }
  // SigV4 signs the path: a prefix stripped by a proxy would break every URL.
  if (
    (url.protocol !== 'http:' && url.protocol !== 'https:') ||
    url.pathname !== '/' ||
    url.search !== '' ||
    url.hash !== '' ||
    url.username !== ''
  ) {
    throw new Error(`S3 publicUrl must be http(s)://host[:port] with nothing after it, got ${JSON.stringify(raw)}`);
  }
  return {
    endPoint: url.hostname.replace(/^\[(.*)\]$/, '$1'),
    ...(url.port ? { port: Number(url.port) } : {}),
    useSSL: url.protocol === 'https:',
  };
}

/**
 * The S3 configuration as one URL (what KERNEX_S3_URL-style settings hold):
 *
 *   s3://ACCESS_KEY:SECRET_KEY@host[:port]/bucket[?ssl=true|false][&region=R][&public_url=URL]
 *
 * - ACCESS_KEY and SECRET_KEY are percent-encoded: write ':' '/' '@' '?' '#'
 *   '%' in a secret as %3A %2F %40 %3F %23 %25.
 * - ssl defaults to true; the port defaults to 443 with ssl, 80 without.
 * - region: the bucket's region (MinIO's default is us-east-1).
 * - public_url: see S3Config.publicUrl (percent-encode it as a query value).
 *
 * Example: s3://minioadmin:minio%2Fsecret@127.0.0.1:9000/kernex-bundles?ssl=false&region=us-east-1
 *
 * Errors never quote the URL, since it carries the secret.
 */
export function parseS3Url(raw: string): S3Config {
  let url: URL;
  try {
    url = new URL(raw);
  } catch {
    throw new Error('invalid S3 URL: expected s3://ACCESS_KEY:SECRET_KEY@host[:port]/bucket');
  }
  const fail = (why: string): never => {
    throw new Error(`invalid S3 URL (s3://ACCESS_KEY:SECRET_KEY@host[:port]/bucket?ssl=&region=): ${why}`);
  };
  if (url.protocol !== 's3:') fail(`the scheme must be s3://, got ${url.protocol}//`);
  const endPoint = url.hostname.replace(/^\[(.*)\]$/, '$1');
  if (endPoint === '') fail('the host is missing');
  if (url.username === '' || url.password === '') fail('the access key and secret key are missing');
  const bucket = url.pathname.replace(/^\//, '');
  if (!/^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$/.test(bucket)) {
    fail('the path must be one bucket name (3-63 characters: lowercase letters, digits, dots, hyphens)');
  }
  if (url.hash !== '') fail('a #fragment is not allowed (percent-encode # in the secret as %23)');

  const config: S3Config = {
    endPoint,
    accessKey: decode(url.username),
    secretKey: decode(url.password),
    bucket,
    useSSL: true,
  };
  if (url.port !== '') config.port = Number(url.port);
  for (const [name, value] of url.searchParams) {
    switch (name) {
      case 'ssl':
        if (value !== 'true' && value !== 'false') fail(`ssl must be true or false, got ${JSON.stringify(value)}`);
        config.useSSL = value === 'true';
        break;
      case 'region':
        if (value === '') fail('region is empty');
        config.region = value;
        break;
      case 'public_url':
        parsePublicUrl(value);
        config.publicUrl = value;
        break;
      default:
        fail(`unknown parameter ${JSON.stringify(name)} (known: ssl, region, public_url)`);
    }
  }
  return config;
}

function decode(component: string): string {
  try {
    return decodeURIComponent(component);
  } catch {
    throw new Error('invalid S3 URL: malformed percent-encoding in the credentials');
  }
}
