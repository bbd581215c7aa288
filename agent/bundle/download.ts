// Bundle download for devices on bad links: bytes already on disk are kept and
// the transfer resumes with a Range request; nothing is trusted until the whole
// file matches the size and sha256 the controller announced.
import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import fs from 'node:fs/promises';
import path from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';

/** The download could not be completed; `status` is the HTTP status when there was one. */
export class DownloadError extends Error {
  readonly code = 'download_failed';
  constructor(
    message: string,
    readonly status: number | undefined,
    /** Worth another attempt (network trouble, 5xx), as opposed to a refusal. */
    readonly retryable: boolean,
    options?: { cause?: unknown },
  ) {
    super(message, options);
    this.name = 'DownloadError';
  }
}

/** The downloaded bytes are not the bundle that was announced; the partial file was deleted. */
export class BundleVerificationError extends Error {
  readonly code = 'bundle_verification_failed';
  constructor(message: string, readonly expected: string, readonly actual: string) {
    super(message);
    this.name = 'BundleVerificationError';
  }
}

export interface DownloadOptions {
  /** Absolute URL of the bundle on the controller (resolve `/api/v1/...` against the controller first). */
  url: string;
  /** Device token, sent only to the controller's own origin. */
  token: string;
  /** Final path; bytes accumulate in `dest + '.part'` until verified. */
  dest: string;
  size: number;
  sha256: string;
  fetchImpl?: typeof fetch;
  /** Failed attempts tolerated in a row; an attempt that made progress resets the count. Default 5. */
  retries?: number;
  /** First backoff delay, doubled on each consecutive failure (with jitter). Default 1000. */
  backoffMs?: number;
  signal?: AbortSignal;
  /** Bytes of the bundle on disk so far (resumed bytes included); awaited, and a rejection aborts like `signal`. */
  onProgress?: (bytes: number) => void | Promise<void>;
}

const MAX_REDIRECTS = 5;
const MAX_BACKOFF_MS = 60_000;
const REDIRECTS = new Set([301, 302, 303, 307, 308]);

/** Streams a file through sha256; hex digest. */
export async function sha256File(file: string): Promise<string> {
  const hash = createHash('sha256');
  for await (const chunk of createReadStream(file)) hash.update(chunk as Buffer);
  return hash.digest('hex');
}

/**
 * Downloads a bundle to `dest`, resuming a previous `.part`, following the
 * controller's redirect to object storage without the device token, retrying
 * network failures and 5xx with exponential backoff, and verifying size and
 * sha256 before the final rename. Throws DownloadError (HTTP refusal, or retries
 * exhausted), BundleVerificationError (wrong bytes; `.part` deleted), or the
 * signal's reason when aborted (`.part` kept for the next try).
 */
export async function downloadBundle(opts: DownloadOptions): Promise<void> {
  const expected = opts.sha256.toLowerCase();
  if (!/^[0-9a-f]{64}$/.test(expected)) throw new TypeError('sha256 must be 64 hexadecimal digits');
  if (!Number.isSafeInteger(opts.size) || opts.size < 0) throw new RangeError(`invalid bundle size ${opts.size}`);
  const ctx: Attempt = {
    url: new URL(opts.url),
    token: opts.token,
    part: `${opts.dest}.part`,
    size: opts.size,
    fetchImpl: opts.fetchImpl ?? fetch,
    signal: opts.signal,
    onProgress: opts.onProgress,
  };
  const retries = opts.retries ?? 5;
  const backoffMs = opts.backoffMs ?? 1000;
  await fs.mkdir(path.dirname(opts.dest), { recursive: true, mode: 0o700 });

  let failures = 0;
  let best = await partSize(ctx.part);
  for (;;) {
    ctx.signal?.throwIfAborted();
    try {
      await attempt(ctx);
      break;
    } catch (err) {
      if (ctx.signal?.aborted) throw ctx.signal.reason;
      if (err instanceof BundleVerificationError) {
        await fs.rm(ctx.part, { force: true });
        throw err;
      }
      if (!(err instanceof DownloadError) || !err.retryable) throw err;
      // A bad link may cut every transfer; as long as each try gets further, keep going.
      const have = await partSize(ctx.part);
      if (have > best) {
        best = have;
        failures = 0;
      }
      failures += 1;
      if (failures > retries) {
        throw new DownloadError(`bundle download failed after ${failures} attempts in a row: ${err.message}`, err.status, false, { cause: err });
      }
      const base = Math.min(backoffMs * 2 ** (failures - 1), MAX_BACKOFF_MS);
      // Jitter, so a fleet cut off at once does not come back at once.
      await sleep(base * (0.5 + Math.random() / 2), undefined, { signal: ctx.signal }).catch(() => {
        throw ctx.signal?.reason ?? new Error('aborted');
      });
    }
  }

  await verify(ctx.part, opts.size, expected);
  await fs.rename(ctx.part, opts.dest);
}

interface Attempt {
  url: URL;
  token: string;
  part: string;
  size: number;
  fetchImpl: typeof fetch;
  signal: AbortSignal | undefined;
  onProgress: ((bytes: number) => void | Promise<void>) | undefined;
}

/** One request: appends to (or restarts) the `.part` file; throws DownloadError on trouble. */
async function attempt(ctx: Attempt): Promise<void> {
  let offset = await partSize(ctx.part);
  if (offset > ctx.size) {
    // Longer than the bundle: not a prefix of it, whatever it is.
    await fs.rm(ctx.part, { force: true });
    offset = 0;
  }
  if (offset > 0 && offset === ctx.size) return; // complete already; verification decides

  const res = await request(ctx, offset);
  try {
    if (res.status === 416 && offset > 0) {
      // The server cannot continue from our offset: the .part is stale. Start over.
      await fs.rm(ctx.part, { force: true });
      throw new DownloadError(`server refused to resume at byte ${offset} (416); restarting from zero`, 416, true);
    }
    if (res.status >= 400) {
      const retryable = res.status >= 500 || res.status === 408 || res.status === 429;
      throw new DownloadError(`bundle download refused: HTTP ${res.status} ${res.statusText} from ${describe(res.url)}`, res.status, retryable);
    }
    let start: number;
    if (res.status === 200) {
      start = 0; // the server ignored Range (or there was none): the body is the whole file
    } else if (res.status === 206 && contentRangeStart(res.headers.get('content-range')) === offset) {
      start = offset;
    } else if (res.status === 206) {
      await fs.rm(ctx.part, { force: true });
      throw new DownloadError(`server answered a range other than bytes=${offset}- ; restarting from zero`, 206, true);
    } else {
      throw new DownloadError(`unexpected HTTP ${res.status} from ${describe(res.url)}`, res.status, false);
    }
    await writeBody(ctx, res, start);
  } finally {
    if (res.body && !res.bodyUsed) await res.body.cancel().catch(() => undefined);
  }
}

/** GET with manual redirects: the token goes to the controller's origin only. */
async function request(ctx: Attempt, offset: number): Promise<Response> {
  let url = ctx.url;
  for (let hop = 0; hop <= MAX_REDIRECTS; hop++) {
    const headers: Record<string, string> = {};
    if (url.origin === ctx.url.origin) headers.authorization = `Bearer ${ctx.token}`;
    if (offset > 0) headers.range = `bytes=${offset}-`;
    let res: Response;
    try {
      res = await ctx.fetchImpl(url, { headers, redirect: 'manual', signal: ctx.signal });
    } catch (err) {
      throw networkError(err, url);
    }
    if (res.type === 'opaqueredirect') {
      throw new DownloadError(`cannot follow the redirect from ${describe(url.href)}: this fetch hides it`, undefined, false);
    }
    if (!REDIRECTS.has(res.status)) return res;
    const location = res.headers.get('location');
    await res.body?.cancel().catch(() => undefined);
    if (!location) throw new DownloadError(`HTTP ${res.status} redirect without a Location from ${describe(url.href)}`, res.status, false);
    const next = new URL(location, url);
    if (next.protocol !== 'http:' && next.protocol !== 'https:') {
      throw new DownloadError(`refusing redirect to ${next.protocol} URL`, res.status, false);
    }
    url = next;
  }
  throw new DownloadError(`more than ${MAX_REDIRECTS} redirects from ${describe(ctx.url.href)}`, undefined, false);
}

async function writeBody(ctx: Attempt, res: Response, start: number): Promise<void> {
  const fh = await fs.open(ctx.part, start > 0 ? 'a' : 'w', 0o600);
  let written = start;
  const chunks = res.body?.[Symbol.asyncIterator]();
  let finished = chunks === undefined;
  try {
    while (chunks !== undefined) {
      // Only the read is a network matter; a failed write (disk full) is not retried.
      let next: IteratorResult<Uint8Array>;
      try {
        next = await chunks.next();
      } catch (err) {
        throw networkError(err, ctx.url);
      }
      if (next.done) {
        finished = true;
        break;
      }
      written += next.value.byteLength;
      if (written > ctx.size) {
        throw new BundleVerificationError(
          `server sent more than the announced ${ctx.size} bytes`, String(ctx.size), `more than ${ctx.size}`,
        );
      }
      await fh.write(next.value);
      await ctx.onProgress?.(written);
    }
  } finally {
    // Leaving early: cancel the stream so the connection is released.
    if (!finished) await chunks?.return?.().catch(() => undefined);
    await fh.close();
  }
  if (written < ctx.size) {
    throw new DownloadError(`connection closed after ${written} of ${ctx.size} bytes`, res.status, true);
  }
}

async function verify(part: string, size: number, expected: string): Promise<void> {
  const actualSize = await partSize(part);
  if (actualSize !== size) {
    await fs.rm(part, { force: true });
    throw new BundleVerificationError(`bundle size mismatch: expected ${size} bytes, got ${actualSize}`, String(size), String(actualSize));
  }
  const actual = await sha256File(part);
  if (actual !== expected) {
    await fs.rm(part, { force: true });
    throw new BundleVerificationError(`bundle sha256 mismatch: expected ${expected}, got ${actual}`, expected, actual);
  }
}

function networkError(err: unknown, url: URL): unknown {
  if (err instanceof Error && err.name === 'AbortError') return err;
  const cause = err instanceof Error && err.cause instanceof Error ? `: ${err.cause.message}` : '';
  const message = err instanceof Error ? err.message : String(err);
  return new DownloadError(`network error talking to ${url.origin}: ${message}${cause}`, undefined, true, { cause: err });
}

function contentRangeStart(header: string | null): number | undefined {
  const m = header === null ? null : /^bytes (\d+)-\d+\/(?:\d+|\*)$/.exec(header.trim());
  return m ? Number(m[1]) : undefined;
}

async function partSize(file: string): Promise<number> {
  try {
    return (await fs.stat(file)).size;
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return 0;
    throw err;
  }
}

// Presigned URLs carry credentials in the query string: never echo it.
function describe(href: string): string {
  try {
    const u = new URL(href);
    return `${u.origin}${u.pathname}`;
  } catch {
    return '(unknown URL)';
  }
}
