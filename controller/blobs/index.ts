// The blob component's public face: the port, and the one function that picks
// a backend from configuration.
import { join } from 'node:path';
import { createFsBlobStore } from './fs.js';
import type { BlobStore } from './port.js';
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
  if (config.s3) return createS3BlobStore(config.s3);
  return createFsBlobStore(join(config.dataDir, 'blobs'));
}
