// The blob port: where bundle bytes live. Filesystem by default, MinIO/S3 in
// production. Keys are opaque strings chosen by the caller (bundle ids), from
// the portable charset checked by `assertBlobKey` below.
import { createHash } from 'node:crypto';
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

/** The backend cannot be reached or written (disk, permissions, network, S3 5xx); worth a retry later. */
export class BlobStoreUnavailableError extends Error {
  readonly code = 'blob_store_unavailable';
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'BlobStoreUnavailableError';
  }
}

export interface BlobStore {
  /**
   * Streams `data` into the store under `key` while hashing it. Nothing is
   * visible under `key` until the stream has ended successfully; on any error
   * (including BlobTooLargeError) nothing is left behind, and a blob already
   * stored under `key` stays as it was.
   */
  put(key: string, data: Readable, options?: PutOptions): Promise<BlobInfo>;
  /**
   * Reads the whole blob, or the inclusive `range` (an `end` past the blob is
   * clamped to its last byte). Throws BlobNotFoundError, BlobRangeError when
   * `range.start` is at or past the end, BlobKeyError for a malformed key.
   */
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

// ---------------------------------------------------------------------------
// Rules every backend shares. They live next to the interface so that a key,
// a range or a limit means the same thing whichever backend is configured.
// ---------------------------------------------------------------------------

/** Thrown for a key outside the portable charset (see `assertBlobKey`). */
export class BlobKeyError extends Error {
  readonly code = 'invalid_blob_key';
  constructor(key: unknown) {
    const shown = typeof key === 'string' ? JSON.stringify(key.slice(0, 80)) : typeof key;
    super(
      `invalid blob key ${shown}: use 1-200 characters from [A-Za-z0-9._-], ` +
        `not starting with '.' and without '..'`,
    );
    this.name = 'BlobKeyError';
  }
}

/** `get` with a range starting at or past the end of the blob (HTTP 416). */
export class BlobRangeError extends Error {
  readonly code = 'range_not_satisfiable';
  constructor(
    key: string,
    readonly range: ByteRange,
  ) {
    super(`range ${range.start}-${range.end} is outside blob ${key}`);
    this.name = 'BlobRangeError';
  }
}

// Keys become file names on disk and object names in S3: one conservative
// charset is safe for both, needs no escaping in a URL, and cannot name a
// parent directory or the filesystem backend's hidden temp directory.
const KEY_PATTERN = /^[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}$/;

export function isValidBlobKey(key: unknown): key is string {
  return typeof key === 'string' && KEY_PATTERN.test(key) && !key.includes('..');
}

export function assertBlobKey(key: unknown): asserts key is string {
  if (!isValidBlobKey(key)) throw new BlobKeyError(key);
}

/** A malformed range is a caller bug (RangeError), unlike an unsatisfiable one. */
export function assertByteRange(range: ByteRange): void {
  const { start, end } = range;
  if (!Number.isSafeInteger(start) || !Number.isSafeInteger(end) || start < 0 || end < start) {
    throw new RangeError(`invalid byte range ${String(start)}-${String(end)}`);
  }
}

/**
 * Size, sha256 and the `maxBytes` limit of a put, fed chunk by chunk as the
 * bytes flow, so no backend ever needs the whole blob in memory to know them.
 */
export class PutMeter {
  private readonly hash = createHash('sha256');
  private size = 0;
  private readonly maxBytes: number;

  constructor(maxBytes?: number) {
    if (maxBytes !== undefined && (!Number.isSafeInteger(maxBytes) || maxBytes < 0)) {
      throw new RangeError(`maxBytes must be a non-negative integer, got ${String(maxBytes)}`);
    }
    this.maxBytes = maxBytes ?? Number.POSITIVE_INFINITY;
  }

  /** Accounts for one chunk; throws BlobTooLargeError once past the limit. */
  add(chunk: unknown): Buffer {
    const bytes = toBuffer(chunk);
    this.size += bytes.length;
    if (this.size > this.maxBytes) throw new BlobTooLargeError(this.maxBytes);
    this.hash.update(bytes);
    return bytes;
  }

  /** Call once, after the last chunk. */
  result(): BlobInfo {
    return { size: this.size, sha256: this.hash.digest('hex') };
  }
}

function toBuffer(chunk: unknown): Buffer {
  if (Buffer.isBuffer(chunk)) return chunk;
  if (chunk instanceof Uint8Array) return Buffer.from(chunk.buffer, chunk.byteOffset, chunk.byteLength);
  // Strings (a stream with setEncoding) are refused rather than re-encoded:
  // the hash must be over the bytes as sent, whatever the encoding was.
  throw new TypeError(`blob data must be a stream of bytes, got a chunk of type ${typeof chunk}`);
}
