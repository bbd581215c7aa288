// Filesystem backend: one file per blob under `dir`, written through a temp
// file in the same directory tree so the final rename is atomic and a reader
// never sees a partial upload.
import { randomUUID } from 'node:crypto';
import { mkdir, open, rename, rm, stat, unlink, type FileHandle } from 'node:fs/promises';
import { join, resolve } from 'node:path';
import type { Readable } from 'node:stream';
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

// Keys cannot start with '.', so this name can never collide with a blob.
const TMP_DIR = '.tmp';

export async function createFsBlobStore(dir: string): Promise<BlobStore> {
  const root = resolve(dir);
  const tmpDir = join(root, TMP_DIR);
  // Anything in the temp dir is a leftover of a crash mid-upload: a data
  // directory belongs to one controller process, so nobody is writing there yet.
  await rm(tmpDir, { recursive: true, force: true });
  await mkdir(tmpDir, { recursive: true });

  const pathOf = (key: string): string => {
    assertBlobKey(key);
    return join(root, key);
  };

  return {
    async put(key: string, data: Readable, options: PutOptions = {}): Promise<BlobInfo> {
      try {
        const target = pathOf(key);
        const meter = new PutMeter(options.maxBytes);
        await writeAtomically(tmpDir, target, data, meter);
        await syncDir(root);
        return meter.result();
      } catch (err) {
        // put owns `data`: a refused upload must not keep its sender streaming.
        data.destroy();
        throw err;
      }
    },

    async get(key: string, range?: ByteRange) {
      const path = pathOf(key);
      if (range) assertByteRange(range);
      // Open first: a stream would only report ENOENT asynchronously, and the
      // open descriptor keeps reading the same bytes if the key is overwritten.
      let file: FileHandle;
      try {
        file = await open(path, 'r');
      } catch (err) {
        if (errnoCode(err) === 'ENOENT') throw new BlobNotFoundError(key);
        throw err;
      }
      try {
        if (range && range.start >= (await file.stat()).size) throw new BlobRangeError(key, range);
        return file.createReadStream(range ? { start: range.start, end: range.end } : {});
      } catch (err) {
        await file.close();
        throw err;
      }
    },

    async stat(key: string) {
      try {
        return { size: (await stat(pathOf(key))).size };
      } catch (err) {
        if (errnoCode(err) === 'ENOENT') return null;
        throw err;
      }
    },

    async delete(key: string) {
      try {
        await unlink(pathOf(key));
      } catch (err) {
        if (errnoCode(err) !== 'ENOENT') throw err;
      }
    },

    async downloadUrl(key: string) {
      assertBlobKey(key);
      return null; // the controller streams the file itself
    },

    async close() {},
  };
}

async function writeAtomically(tmpDir: string, target: string, data: Readable, meter: PutMeter) {
  const tmp = join(tmpDir, randomUUID());
  const file = await open(tmp, 'wx', 0o644);
  let closed = false;
  try {
    // Throwing out of this loop (limit exceeded, write error) destroys `data`,
    // so the rest of an oversized upload is never read.
    for await (const chunk of data) await writeAll(file, meter.add(chunk));
    await file.sync();
    closed = true;
    await file.close();
    await rename(tmp, target);
  } catch (err) {
    if (!closed) await file.close().catch(() => undefined);
    await rm(tmp, { force: true });
    throw err;
  }
}

async function writeAll(file: FileHandle, bytes: Buffer): Promise<void> {
  let offset = 0;
  while (offset < bytes.length) {
    const { bytesWritten } = await file.write(bytes, offset, bytes.length - offset);
    offset += bytesWritten;
  }
}

// Makes the rename itself durable, not just the file's bytes. Best effort:
// some platforms and filesystems refuse to fsync a directory.
async function syncDir(path: string): Promise<void> {
  let handle: FileHandle | undefined;
  try {
    handle = await open(path, 'r');
    await handle.sync();
  } catch {
    // the blob is complete and visible; only crash durability is weaker
  } finally {
    await handle?.close().catch(() => undefined);
  }
}

// Structural, not `instanceof Error`: errors can come from another realm
// (jest's VM sandbox, worker threads) where that check is false.
function errnoCode(err: unknown): string | undefined {
  return typeof err === 'object' && err !== null && 'code' in err && typeof err.code === 'string'
    ? err.code
    : undefined;
}
