// The blob port: where bundle bytes live. Filesystem by default, MinIO/S3 in
// production. Keys are opaque strings chosen by the caller (bundle ids).
import type { Readable } from 'node:stream';

export interface BlobInfo {
  size: number;
  sha256: string;
}

/** Inclusive byte range, as in an HTTP Range header. */
export interface ByteRange {
  start: number;
  end: number;
}

export interface PutOptions {
  /** Refuse (and store nothing) once the stream exceeds this many bytes. */
  maxBytes?: number;
}

export class BlobTooLargeError extends Error {
  readonly code = 'blob_too_large';
  constructor(readonly maxBytes: number) {
    super(`upload exceeds the limit of ${maxBytes} bytes`);
    this.name = 'BlobTooLargeError';
  }
}

export class BlobNotFoundError extends Error {
  readonly code = 'blob_not_found';
  constructor(key: string) {
    super(`blob ${key} not found`);
    this.name = 'BlobNotFoundError';
  }
}

export interface BlobStore {
  /**
   * Streams `data` into the store under `key` while hashing it. Nothing is
   * visible under `key` until the stream has ended successfully; on any error
   * (including BlobTooLargeError) nothing is left behind.
   */
  put(key: string, data: Readable, options?: PutOptions): Promise<BlobInfo>;
  /** Reads the whole blob, or the inclusive `range`. Throws BlobNotFoundError. */
  get(key: string, range?: ByteRange): Promise<Readable>;
  /** Size of the blob, or null when absent. */
  stat(key: string): Promise<{ size: number } | null>;
  /** Removes the blob; absent keys are not an error. */
  delete(key: string): Promise<void>;
  /**
   * A short-lived URL a device can download from directly (presigned), or
   * null when bytes must be served by the controller itself.
   */
  downloadUrl(key: string, ttlSeconds: number): Promise<string | null>;
  close(): Promise<void>;
}
