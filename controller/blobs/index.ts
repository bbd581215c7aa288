// The blob component's public face: the port, and the one function that picks
// a backend from configuration.
import { join } from 'node:path';
import { createFsBlobStore } from './fs.js';
import { BlobStoreUnavailableError, type BlobStore } from './port.js';
import { createS3BlobStore, type S3Config } from './s3.js';

export * from './port.js';
export { parseS3Url, type S3Config } from './s3.js';

export interface BlobStoreConfig {
  /** The controller's data directory; blobs go to `<dataDir>/blobs`. */
  dataDir: string;
  /** When given, blobs live in this S3/MinIO bucket instead. */
  s3?: S3Config;
}

/**
 * The filesystem store under `<dataDir>/blobs`, or the S3 store when `s3` is
 * given (s3.ts loads the `minio` client only then, so embedded mode never does).
 */
export async function openBlobStore(config: BlobStoreConfig): Promise<BlobStore> {
  if (config.s3) return withAvailability(await createS3BlobStore(config.s3), `the S3 bucket ${config.s3.bucket}`);
  const dir = join(config.dataDir, 'blobs');
  return withAvailability(await createFsBlobStore(dir), dir);
}

// Errors that say the backend, not the request, is at fault: the filesystem
// (full, read-only, a path that is not a directory) or the network.
const UNAVAILABLE_ERRNO = new Set([
  'EACCES', 'EPERM', 'EROFS', 'ENOSPC', 'EDQUOT', 'EIO', 'ENOTDIR', 'EISDIR', 'EMFILE', 'ENFILE', 'EBUSY',
  'ECONNREFUSED', 'ECONNRESET', 'ETIMEDOUT', 'EHOSTUNREACH', 'ENETUNREACH', 'EAI_AGAIN', 'ENOTFOUND', 'EPIPE',
  'UND_ERR_CONNECT_TIMEOUT', 'UND_ERR_SOCKET',
]);
// S3 error codes that mean "the service is in trouble", not "your request is wrong".
const UNAVAILABLE_S3 = new Set(['InternalError', 'ServiceUnavailable', 'SlowDown', 'RequestTimeout']);

function unavailable(err: unknown, where: string, op: string, missingDirToo: boolean): unknown {
  if (typeof err !== 'object' || err === null || err instanceof BlobStoreUnavailableError) return err;
  const code = 'code' in err && typeof err.code === 'string' ? err.code : undefined;
  const cause = 'cause' in err && typeof err.cause === 'object' && err.cause !== null && 'code' in err.cause
    && typeof err.cause.code === 'string' ? err.cause.code : undefined;
  const hit = [code, cause].find((c) => c !== undefined && (UNAVAILABLE_ERRNO.has(c) || UNAVAILABLE_S3.has(c)
    || (missingDirToo && c === 'ENOENT')));
  if (!hit) return err;
  const message = err instanceof Error ? err.message : String(err);
  return new BlobStoreUnavailableError(`cannot ${op} ${where} (${hit}: ${message})`, { cause: err });
}

/**
 * The same store, with backend failures raised as BlobStoreUnavailableError
 * (HTTP 503) whichever backend it is; the backends themselves stay plain.
 */
function withAvailability(store: BlobStore, where: string): BlobStore {
  const guard = <A extends unknown[], R>(op: string, fn: (...args: A) => Promise<R>, missingDirToo = false) =>
    async (...args: A): Promise<R> => {
      try {
        return await fn(...args);
      } catch (err) {
        throw unavailable(err, where, op, missingDirToo);
      }
    };
  return {
    // A put never expects ENOENT: only a vanished directory causes it.
    put: guard('write to', store.put.bind(store), true),
    get: guard('read from', store.get.bind(store)),
    stat: guard('read from', store.stat.bind(store)),
    delete: guard('delete from', store.delete.bind(store)),
    downloadUrl: guard('sign a URL for', store.downloadUrl.bind(store)),
    close: () => store.close(),
  };
}
