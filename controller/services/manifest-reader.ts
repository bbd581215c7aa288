// Reads manifest.json out of a bundle archive as it streams past, so the
// upload is validated without a second read of the stored bytes.
import { Parser, type ReadEntry } from 'tar';
import { Writable } from 'node:stream';
import { createGunzip } from 'node:zlib';
import { validate, SchemaError, type BundleManifest } from '../../schemas/index.js';
import { badRequest } from '../errors.js';

const MAX_MANIFEST_BYTES = 64 * 1024;

/**
 * What an archive may unpack to. The same defaults as the agent's extraction
 * limits, so a bundle the agent would refuse as a bomb is refused at upload,
 * and refused from its headers, without inflating it.
 */
export interface UnpackLimits {
  maxUnpackedBytes: number;
  maxEntries: number;
}
export const DEFAULT_UNPACK_LIMITS: UnpackLimits = { maxUnpackedBytes: 512 * 1024 * 1024, maxEntries: 10_000 };
// Tar framing around file bodies (headers, padding, long names), as the agent allows for.
const FRAMING_PER_ENTRY = 8 * 1024;
const FRAMING_SLACK = 1024 * 1024;

const isManifestPath = (p: string) => p === 'manifest.json' || p === './manifest.json';

/** Why an entry could never be extracted safely on a device, or null. */
export function unsafeEntry(entry: { path: string; type: string; linkpath?: string }): string | null {
  const escapes = (p: string) => p.startsWith('/') || /^[A-Za-z]:/.test(p) || p.split(/[\\/]/).includes('..');
  if (escapes(entry.path)) return `entry '${entry.path}' points outside the bundle`;
  if (['CharacterDevice', 'BlockDevice', 'FIFO'].includes(entry.type)) return `entry '${entry.path}' is a device file`;
  if (entry.type === 'Link') return `entry '${entry.path}' is a hard link; bundles may not contain hard links`;
  if (entry.type === 'SymbolicLink' && entry.linkpath !== undefined) {
    const target = entry.linkpath.startsWith('/') ? entry.linkpath : [...entry.path.split('/').slice(0, -1), entry.linkpath].join('/');
    let depth = 0;
    for (const part of target.split('/')) {
      if (part === '..') depth--;
      else if (part && part !== '.') depth++;
      if (depth < 0 || target.startsWith('/')) return `symlink '${entry.path}' points outside the bundle`;
    }
  }
  return null;
}

/**
 * A writable sink for the archive bytes; `manifest` settles once the archive
 * has been read to its end, with the validated manifest or an ApiError(400)
 * saying what is wrong with the bundle.
 */
export function manifestSink(limits: UnpackLimits = DEFAULT_UNPACK_LIMITS): { sink: Writable; manifest: Promise<BundleManifest> } {
  let raw: Buffer | null = null;
  let problem: string | null = null;
  let first = true;
  let entries = 0;
  let unpacked = 0;
  let inflated = 0;
  const inflateCap = limits.maxUnpackedBytes + limits.maxEntries * FRAMING_PER_ENTRY + FRAMING_SLACK;
  let settle!: (m: BundleManifest) => void;
  let fail!: (e: Error) => void;
  const manifest = new Promise<BundleManifest>((res, rej) => {
    settle = res;
    fail = rej;
  });
  manifest.catch(() => {});

  const parser = new Parser({
    strict: true,
    onReadEntry(entry: ReadEntry) {
      const unsafe = unsafeEntry(entry);
      if (unsafe) refuse(`unsafe bundle: ${unsafe}`);
      entries++;
      unpacked += entry.size ?? 0;
      if (entries > limits.maxEntries) refuse(`the archive has more than ${limits.maxEntries} entries`);
      if (unpacked > limits.maxUnpackedBytes) {
        refuse(`the archive unpacks to more than ${limits.maxUnpackedBytes} bytes (at entry '${entry.path}')`);
      }
      if (!isManifestPath(entry.path) || entry.type !== 'File') return entry.resume();
      if (entry.size > MAX_MANIFEST_BYTES) {
        refuse(`manifest.json is larger than ${MAX_MANIFEST_BYTES} bytes`);
        return entry.resume();
      }
      const chunks: Buffer[] = [];
      entry.on('data', (c: Buffer) => chunks.push(c));
      entry.on('end', () => (raw = Buffer.concat(chunks)));
    },
  });
  parser.on('error', (err: Error) => {
    refuse(`the archive is corrupt or not a tar.gz (${err.message})`);
    if (ended) finish();
  });
  let ended = false;
  parser.on('warn', (_code: string, message: string) => refuse(`the archive is corrupt (${message})`));

  // Decompressed here rather than inside tar, so the inflated bytes can be
  // counted: a stream that inflates beyond what its entries explain is a bomb.
  const gunzip = createGunzip();
  gunzip.on('data', (d: Buffer) => {
    if (problem) return;
    inflated += d.length;
    if (inflated > inflateCap) {
      refuse(`the archive decompresses to more than ${inflateCap} bytes`);
      return;
    }
    if (!parser.write(d)) {
      gunzip.pause();
      parser.once('drain', () => gunzip.resume());
    }
  });
  gunzip.on('end', () => {
    if (problem) return finish();
    ended = true;
    parser.once('end', finish);
    parser.once('close', finish);
    parser.end();
  });
  gunzip.on('error', (err: Error) => {
    refuse(`the archive is corrupt or not a tar.gz (${err.message})`);
    finish();
  });

  // A write waiting for gunzip to drain; released when a problem makes the rest moot.
  let waiting: (() => void) | null = null;
  const release = () => {
    const cb = waiting;
    waiting = null;
    cb?.();
  };
  /** Records the first problem; from then on bytes are drained, so nothing may stay blocked. */
  function refuse(why: string): void {
    problem ??= why;
    gunzip.resume();
    release();
  }


  let finished = false;
  const finish = () => {
    if (finished) return;
    finished = true;
    if (problem) return fail(badRequest(problem, 'invalid_bundle'));
    if (!raw) return fail(badRequest('the bundle has no manifest.json at its root', 'invalid_bundle'));
    try {
      const data: unknown = JSON.parse(raw.toString('utf8'));
      settle(validate.manifest.parse(data));
    } catch (err) {
      const why = err instanceof SchemaError ? err.details.join('; ') : `malformed JSON (${(err as Error).message})`;
      fail(badRequest(`invalid manifest.json: ${why}`, 'invalid_manifest'));
    }
  };

  const sink = new Writable({
    write(chunk: Buffer, _enc, cb) {
      if (first) {
        first = false;
        if (chunk.length < 2 || chunk[0] !== 0x1f || chunk[1] !== 0x8b) refuse('the upload is not a gzip file (.tar.gz expected)');
      }
      // After a problem the rest is only drained, never inflated, so the upload can finish and be discarded.
      if (problem) return cb();
      if (gunzip.write(chunk)) return cb();
      waiting = cb;
      gunzip.once('drain', release);
    },
    final(cb) {
      if (problem) {
        finish();
        gunzip.destroy();
        return cb();
      }
      gunzip.end();
      cb();
    },
  });
  sink.on('error', (err) => fail(err));
  return { sink, manifest };
}
