// Bundle extraction is the agent's security boundary: archives come over the
// network and are unpacked by a process that is often root. The archive is read
// twice from one open file descriptor (so both passes see the same bytes):
//   1. a dry run through tar's parser that checks every header against
//      EntryPolicy and writes nothing, so hostile or oversized archives are
//      refused before any byte reaches the disk;
//   2. the real extraction into a fresh staging directory, with the same policy
//      as a filter and tar's own protections on; any tar warning is a failure.
// The staging tree is then audited (link targets resolved for real), the
// manifest validated, and only then renamed onto the target directory.
import { randomBytes } from 'node:crypto';
import type { Stats } from 'node:fs';
import type { FileHandle } from 'node:fs/promises';
import fs from 'node:fs/promises';
import path from 'node:path';
import { Transform, type TransformCallback } from 'node:stream';
import { createGunzip } from 'node:zlib';
import * as tar from 'tar';
import { validate, SchemaError, type BundleManifest } from '../../schemas/index.js';

/** The archive tries something a bundle must never do; it was refused and nothing was kept. */
export class UnsafeBundleError extends Error {
  readonly code = 'unsafe_bundle';
  constructor(message: string) {
    super(message);
    this.name = 'UnsafeBundleError';
  }
}

/** The archive is not a well-formed bundle (not gzip, corrupt tar, bad or missing manifest, missing script). */
export class BundleFormatError extends Error {
  readonly code = 'invalid_bundle';
  constructor(message: string) {
    super(message);
    this.name = 'BundleFormatError';
  }
}

export interface ExtractLimits {
  /** Total size of all regular files once unpacked. */
  maxBytes?: number;
  /** Number of entries in the archive (files, directories, symlinks). */
  maxEntries?: number;
}

export interface ExtractHooks {
  /** Runs once the staging tree is complete and checked, before it replaces the target; throwing aborts. */
  beforeCommit?: (stagingDir: string) => Promise<void>;
}

export const DEFAULT_MAX_BYTES = 512 * 1024 * 1024;
export const DEFAULT_MAX_ENTRIES = 10_000;

// Tar framing around the file bodies: a 512-byte header, padding to 512 and, for
// long names, a pax header. 8 KiB per entry covers 4 KiB paths; the slack covers
// the end-of-archive blocks and record padding. Beyond that the decompressed
// stream is not explained by the entries, so it is treated as a bomb.
const FRAMING_PER_ENTRY = 8 * 1024;
const FRAMING_SLACK = 1024 * 1024;
// Pax records hold paths and times; tar's own default (1 MiB each) is far more
// than a bundle needs and would let pax padding dodge the byte budget.
const MAX_META_ENTRY = 64 * 1024;
const MAX_MANIFEST_BYTES = 1024 * 1024;

const FILE_TYPES = new Set(['File', 'OldFile', 'ContiguousFile']);

/**
 * Extracts a bundle archive (.tar.gz) into `targetDir`, replacing what was there,
 * and returns its validated manifest. Refuses with UnsafeBundleError (absolute
 * paths, `..`, any hardlink, symlinks leaving the bundle, devices, FIFOs, size or
 * entry-count limits) or BundleFormatError (not gzip, corrupt, bad manifest,
 * missing script). On any failure nothing is left behind: the staging directory
 * is removed and `targetDir` is untouched. The parent of `targetDir` must be
 * writable by the agent only (tar's own advice: no extraction can be safe in a
 * directory an attacker can swap things in).
 */
export async function extractBundle(
  archive: string,
  targetDir: string,
  limits: ExtractLimits = {},
  hooks: ExtractHooks = {},
): Promise<BundleManifest> {
  const maxBytes = positiveInteger(limits.maxBytes ?? DEFAULT_MAX_BYTES, 'maxBytes');
  const maxEntries = positiveInteger(limits.maxEntries ?? DEFAULT_MAX_ENTRIES, 'maxEntries');
  const target = path.resolve(targetDir);
  if (target === path.parse(target).root) throw new Error(`refusing to extract a bundle onto ${target}`);
  const rawCap = maxBytes + maxEntries * FRAMING_PER_ENTRY + FRAMING_SLACK;

  const fh = await fs.open(archive, 'r');
  let staging: string | undefined;
  try {
    await assertGzip(fh, archive);
    await runTar(fh, rawCap, true, (fail) =>
      tar.t({ maxMetaEntrySize: MAX_META_ENTRY, filter: policyFilter(new EntryPolicy(maxBytes, maxEntries), fail, false) }),
    );

    await fs.mkdir(path.dirname(target), { recursive: true });
    // mkdtemp: a fresh 0700 directory nobody else could have prepared for us.
    staging = await fs.mkdtemp(`${target}.staging-`);
    const cwd = staging;
    await runTar(fh, rawCap, false, (fail) =>
      tar.x({
        cwd,
        // Root would otherwise get the archive's uid/gid.
        preserveOwner: false,
        // Modes are masked per entry below; no chmod pass over existing entries.
        chmod: false,
        // Implicit parent dirs and mode-less entries must not inherit a lax umask.
        dmode: 0o755,
        fmode: 0o644,
        maxMetaEntrySize: MAX_META_ENTRY,
        filter: policyFilter(new EntryPolicy(maxBytes, maxEntries), fail, true),
        onReadEntry: maskMode,
      }),
    );

    const root = await fs.realpath(staging);
    await auditTree(root);
    const manifest = await readManifest(root);
    await resolveBundlePath(root, manifest.deploy.script, 'deploy.script');
    if (manifest.rollback) await resolveBundlePath(root, manifest.rollback.script, 'rollback.script');

    await hooks.beforeCommit?.(staging);
    await replaceDir(staging, target);
    staging = undefined;
    return manifest;
  } finally {
    await fh.close();
    if (staging !== undefined) await removeTree(staging);
  }
}

/**
 * Removes what an extraction into `targetDir` leaves behind when the process is
 * killed midway: staging trees that were never committed and old trees a swap
 * did not get to delete. `targetDir` itself is always whole (or absent), since
 * it only ever appears by a rename. Returns the names removed.
 */
export async function removeStaleExtractions(targetDir: string): Promise<string[]> {
  const target = path.resolve(targetDir);
  const base = path.basename(target);
  let names: string[];
  try {
    names = await fs.readdir(path.dirname(target));
  } catch (err) {
    if (errnoCode(err) === 'ENOENT') return [];
    throw err;
  }
  const stale = names.filter((n) => n.startsWith(`${base}.staging-`) || n.startsWith(`${base}.old-`));
  for (const name of stale) await removeTree(path.join(path.dirname(target), name));
  return stale;
}

/**
 * Resolves `rel` (a script path from the manifest) inside `bundleDir`, following
 * symlinks, and returns the real path of a regular file that stays inside it.
 */
export async function resolveBundlePath(bundleDir: string, rel: string, label = 'script'): Promise<string> {
  const segments = rel.split(/[\\/]/);
  if (path.isAbsolute(rel) || path.win32.isAbsolute(rel) || segments.includes('..')) {
    throw new UnsafeBundleError(`${label} '${rel}' must be a relative path inside the bundle`);
  }
  const root = await fs.realpath(bundleDir);
  let real: string;
  try {
    real = await fs.realpath(path.join(root, rel));
  } catch (err) {
    const code = errnoCode(err);
    if (code === 'ENOENT' || code === 'ENOTDIR') {
      throw new BundleFormatError(`${label} '${rel}' not found in the bundle`);
    }
    if (code === 'ELOOP') throw new UnsafeBundleError(`${label} '${rel}' is a symlink loop`);
    throw err;
  }
  if (!isInside(root, real)) {
    throw new UnsafeBundleError(`${label} '${rel}' resolves to ${real}, outside the bundle`);
  }
  const st = await fs.stat(real);
  if (!st.isFile()) throw new BundleFormatError(`${label} '${rel}' is not a regular file`);
  return real;
}

/** The header fields the policy looks at. */
export interface EntryHeader {
  path: string;
  type: string;
  size: number;
  linkpath?: string;
}

/**
 * Decides, from headers alone and in archive order, whether an entry may be
 * unpacked. Stateful: it keeps the running totals and the symlinks seen so far.
 * Hardlinks are refused outright, even ones pointing inside the bundle: they are
 * never needed in a bundle and are historically the root of extraction bugs.
 */
export class EntryPolicy {
  private entries = 0;
  private bytes = 0;
  private readonly symlinks = new Set<string>();

  constructor(private readonly maxBytes: number, private readonly maxEntries: number) {}

  /** Throws UnsafeBundleError if the entry must not be unpacked. */
  admit(entry: EntryHeader): void {
    const name = JSON.stringify(entry.path);
    this.entries += 1;
    if (this.entries > this.maxEntries) {
      throw new UnsafeBundleError(`archive has more than ${this.maxEntries} entries (limit reached at entry ${name})`);
    }
    const rel = relativeEntryPath(entry.path);

    switch (entry.type) {
      case 'File':
      case 'OldFile':
      case 'ContiguousFile':
      case 'Directory':
      case 'SymbolicLink':
        break;
      case 'Link':
        throw new UnsafeBundleError(`refused entry ${name}: hardlinks are not allowed in a bundle (-> ${JSON.stringify(entry.linkpath ?? '')})`);
      case 'CharacterDevice':
      case 'BlockDevice':
        throw new UnsafeBundleError(`refused entry ${name}: device files are not allowed in a bundle`);
      case 'FIFO':
        throw new UnsafeBundleError(`refused entry ${name}: FIFOs are not allowed in a bundle`);
      default:
        throw new UnsafeBundleError(`refused entry ${name}: unsupported entry type ${entry.type}`);
    }
    if (rel === '' && entry.type !== 'Directory') {
      throw new UnsafeBundleError(`refused entry ${name}: only a directory may stand for the bundle root`);
    }

    // Tar refuses to write through a symlink too; checking here refuses the
    // archive as a whole instead of skipping one entry.
    const parts = rel === '' ? [] : rel.split('/');
    for (let i = 1; i < parts.length; i++) {
      const prefix = parts.slice(0, i).join('/');
      if (this.symlinks.has(prefix)) {
        throw new UnsafeBundleError(`refused entry ${name}: it would be written through the symlink ${JSON.stringify(prefix)}`);
      }
    }

    if (entry.type === 'SymbolicLink') {
      checkSymlinkTarget(rel, entry.linkpath ?? '', name);
      this.symlinks.add(rel);
    }

    if (FILE_TYPES.has(entry.type)) {
      // The parser hands out exactly `size` body bytes, so this is the unpacked
      // size; the raw decompressed stream is capped separately (ByteMeter).
      this.bytes += entry.size;
      if (this.bytes > this.maxBytes) {
        throw new UnsafeBundleError(`archive unpacks to more than ${this.maxBytes} bytes (limit reached at entry ${name}, ${entry.size} bytes)`);
      }
    }
  }
}

/** `a/./b/` → `a/b`; '' for the root. Throws for absolute paths and `..`. */
function relativeEntryPath(p: string): string {
  const name = JSON.stringify(p);
  if (p === '') throw new UnsafeBundleError('refused entry with an empty path');
  // win32 rules as well: tar strips `C:` and `\\` roots on every platform.
  if (path.posix.isAbsolute(p) || path.win32.isAbsolute(p) || path.win32.parse(p).root !== '') {
    throw new UnsafeBundleError(`refused entry ${name}: absolute path`);
  }
  const segments = p.split(/[\\/]/);
  if (segments.includes('..')) throw new UnsafeBundleError(`refused entry ${name}: path contains '..'`);
  return segments.filter((s) => s !== '' && s !== '.').join('/');
}

function checkSymlinkTarget(rel: string, linkpath: string, name: string): void {
  const shown = JSON.stringify(linkpath);
  if (linkpath === '') throw new UnsafeBundleError(`refused symlink ${name}: empty target`);
  if (path.posix.isAbsolute(linkpath) || path.win32.isAbsolute(linkpath) || path.win32.parse(linkpath).root !== '') {
    throw new UnsafeBundleError(`refused symlink ${name} -> ${shown}: absolute target`);
  }
  // Lexical check only; chains of links are resolved for real in auditTree.
  const resolved = path.posix.normalize(path.posix.join(path.posix.dirname(rel), linkpath.replaceAll('\\', '/')));
  if (resolved === '..' || resolved.startsWith('../')) {
    throw new UnsafeBundleError(`refused symlink ${name} -> ${shown}: target is outside the bundle`);
  }
}

type Fail = (err: Error) => void;

function policyFilter(policy: EntryPolicy, fail: Fail, admitted: boolean): (p: string, entry: tar.ReadEntry | Stats) => boolean {
  return (_p, entry) => {
    if (!(entry instanceof tar.ReadEntry)) return false;
    try {
      policy.admit({ path: entry.path, type: entry.type, size: entry.size, linkpath: entry.linkpath });
    } catch (err) {
      fail(err as Error);
      return false;
    }
    // The dry run only needs headers: returning false lets the parser skip bodies.
    return admitted;
  };
}

// Runs before tar's own entry handler (listeners fire in registration order), so
// the file is created with the masked mode: no setuid/setgid/sticky, nothing
// group- or world-writable that another local user could swap before root runs it.
function maskMode(entry: tar.ReadEntry): void {
  if (typeof entry.mode !== 'number') return;
  entry.mode = entry.type === 'Directory' ? (entry.mode & 0o755) | 0o700 : (entry.mode & 0o755) | 0o600;
}

/** Counts decompressed bytes and errors as soon as the running total exceeds the cap. */
class ByteMeter extends Transform {
  private seen = 0;
  constructor(private readonly cap: number) {
    super();
  }
  override _transform(chunk: Buffer, _enc: BufferEncoding, cb: TransformCallback): void {
    this.seen += chunk.length;
    if (this.seen > this.cap) {
      cb(new UnsafeBundleError(`archive decompresses to more than ${this.cap} bytes; refused as a possible gzip bomb`));
      return;
    }
    cb(null, chunk);
  }
}

/**
 * Streams the archive (from offset 0 of `fh`) through gunzip and a byte meter into
 * the tar parser made by `makeSink`. Any warning or refusal makes the run fail.
 * With `failFast`, the first refusal stops everything (dry run: nothing to clean).
 * Otherwise a refused entry is only skipped and the run fails once tar is done,
 * so the staging directory is not being written while it is removed; only a
 * stream error (which the dry run would have caught) stops it midway.
 */
function runTar(fh: FileHandle, rawCap: number, failFast: boolean, makeSink: (fail: Fail) => tar.Parser): Promise<void> {
  return new Promise<void>((resolve, reject) => {
    let settled = false;
    let firstFailure: Error | undefined;
    const src = fh.createReadStream({ start: 0, autoClose: false });
    const gunzip = createGunzip();
    const meter = new ByteMeter(rawCap);

    const settle = (err?: Error): void => {
      if (settled) return;
      settled = true;
      const failure = firstFailure ?? err;
      if (failure) {
        src.unpipe();
        src.destroy();
        gunzip.destroy();
        meter.destroy();
        reject(failure);
      } else {
        resolve();
      }
    };
    const fail: Fail = (err) => {
      firstFailure ??= err;
      if (failFast) settle();
    };

    const sink = makeSink(fail);
    sink.on('warn', (code: string, message: string, data: TarProblem) => fail(classifyTarProblem(code, message, data)));
    sink.on('error', (err: Error & TarProblem) => settle(classifyTarProblem(typeof err.tarCode === 'string' ? err.tarCode : '', err.message, err)));
    // Oversized pax/long-name records are dropped silently by tar; a dropped
    // long path would change which file an entry lands in.
    sink.on('ignoredEntry', (entry: tar.ReadEntry) => {
      if (entry.meta) fail(new UnsafeBundleError(`refused archive: metadata record larger than ${MAX_META_ENTRY} bytes`));
    });
    sink.on('close', () => settle());

    src.on('error', (err) => settle(err));
    gunzip.on('error', (err) => settle(new BundleFormatError(`archive is not valid gzip data (${err.message}); is it truncated?`)));
    meter.on('error', (err) => settle(err));
    src.pipe(gunzip).pipe(meter).pipe(sink as unknown as NodeJS.WritableStream);
  });
}

/** What tar attaches to its warnings and errors (its WarnData type is not exported). */
interface TarProblem {
  code?: unknown;
  tarCode?: unknown;
  entry?: { path?: string };
  path?: unknown;
}

function classifyTarProblem(code: string, message: string, data: TarProblem): Error {
  if (message.length === 0) message = code;
  if (code === 'TAR_ENTRY_INVALID' || code === 'TAR_BAD_ARCHIVE' || code === 'TAR_ABORT') {
    return new BundleFormatError(`corrupt tar archive: ${message}`);
  }
  const entry = data.entry?.path ?? (typeof data.path === 'string' ? data.path : undefined);
  const where = entry === undefined ? '' : ` entry ${JSON.stringify(entry)}`;
  const errno = typeof data.code === 'string' && /^E[A-Z]+$/.test(data.code) ? data.code : undefined;
  if (errno !== undefined && errno !== 'ENOTDIR' && errno !== 'EEXIST' && errno !== 'ELOOP') {
    // Disk full, permissions: the archive is not to blame.
    return new Error(`extracting${where} failed: ${message}`);
  }
  return new UnsafeBundleError(`refused${where}: ${message} (${code})`);
}

async function assertGzip(fh: FileHandle, archive: string): Promise<void> {
  const magic = Buffer.alloc(2);
  const { bytesRead } = await fh.read(magic, 0, 2, 0);
  if (bytesRead < 2 || magic[0] !== 0x1f || magic[1] !== 0x8b) {
    throw new BundleFormatError(`${path.basename(archive)} is not a gzip-compressed tar archive (.tar.gz)`);
  }
}

/** Walks the unpacked tree with real filesystem semantics: what is there is what runs. */
async function auditTree(root: string): Promise<void> {
  const pending = [root];
  while (pending.length > 0) {
    const dir = pending.pop() as string;
    for (const dirent of await fs.readdir(dir, { withFileTypes: true })) {
      const full = path.join(dir, dirent.name);
      const rel = path.relative(root, full);
      if (dirent.isDirectory()) {
        pending.push(full);
      } else if (dirent.isSymbolicLink()) {
        let real: string;
        try {
          real = await fs.realpath(full);
        } catch {
          // Dangling or looping: cannot prove where it points once things appear.
          throw new UnsafeBundleError(`refused symlink ${JSON.stringify(rel)}: its target does not exist inside the bundle`);
        }
        if (!isInside(root, real) && real !== root) {
          throw new UnsafeBundleError(`refused symlink ${JSON.stringify(rel)}: resolves to ${real}, outside the bundle`);
        }
      } else if (dirent.isFile()) {
        const st = await fs.lstat(full);
        if (st.nlink > 1) throw new UnsafeBundleError(`refused entry ${JSON.stringify(rel)}: hardlinked file`);
        if ((st.mode & 0o7022) !== 0) await fs.chmod(full, st.mode & 0o755);
      } else {
        throw new UnsafeBundleError(`refused entry ${JSON.stringify(rel)}: not a file, directory or symlink`);
      }
    }
  }
}

async function readManifest(root: string): Promise<BundleManifest> {
  const file = path.join(root, 'manifest.json');
  let st;
  try {
    st = await fs.lstat(file);
  } catch (err) {
    if (errnoCode(err) === 'ENOENT') throw new BundleFormatError('manifest.json is missing at the bundle root');
    throw err;
  }
  if (!st.isFile()) throw new BundleFormatError('manifest.json at the bundle root must be a regular file');
  if (st.size > MAX_MANIFEST_BYTES) throw new BundleFormatError(`manifest.json is larger than ${MAX_MANIFEST_BYTES} bytes`);
  let data: unknown;
  try {
    data = JSON.parse(await fs.readFile(file, 'utf8'));
  } catch (err) {
    throw new BundleFormatError(`manifest.json is not valid JSON: ${(err as Error).message}`);
  }
  try {
    return validate.manifest.parse(data);
  } catch (err) {
    if (err instanceof SchemaError) throw new BundleFormatError(`manifest.json is invalid: ${err.details.join('; ')}`);
    throw err;
  }
}

/** Swaps `staging` in for `target`; the old tree is restored if the swap fails. */
async function replaceDir(staging: string, target: string): Promise<void> {
  const old = `${target}.old-${randomBytes(6).toString('hex')}`;
  let moved = false;
  try {
    await fs.rename(target, old);
    moved = true;
  } catch (err) {
    if (errnoCode(err) !== 'ENOENT') throw err;
  }
  try {
    await fs.rename(staging, target);
  } catch (err) {
    if (moved) await fs.rename(old, target);
    throw err;
  }
  if (moved) await removeTree(old);
}

async function removeTree(dir: string): Promise<void> {
  await fs.rm(dir, { recursive: true, force: true, maxRetries: 5, retryDelay: 50 });
}

/** Strictly below `root` (both real paths). */
function isInside(root: string, candidate: string): boolean {
  const rel = path.relative(root, candidate);
  return rel !== '' && rel !== '..' && !rel.startsWith(`..${path.sep}`) && !path.isAbsolute(rel);
}

function positiveInteger(n: number, name: string): number {
  if (!Number.isSafeInteger(n) || n <= 0) throw new RangeError(`${name} must be a positive integer, got ${n}`);
  return n;
}

function errnoCode(err: unknown): string | undefined {
  return typeof err === 'object' && err !== null && 'code' in err && typeof err.code === 'string' ? err.code : undefined;
}
