// The REST client: one place that turns HTTP failures into sentences a
// person can act on, with the exit code scripts can branch on.
import { randomBytes } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { stat } from 'node:fs/promises';
import http from 'node:http';
import https from 'node:https';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { CtlError, EXIT } from './errors.js';
import type { Bundle } from './types.js';

const REQUEST_TIMEOUT_MS = 30_000;

export interface ApiClientOptions {
  server: string;
  token: string | undefined;
  tokenSource: string;
  credentialsFile: string;
  /** Called with one line per request when --verbose. */
  trace?: (line: string) => void;
}

/** Per-request wording for a 404, e.g. "device dev-9 not found: `kernexctl devices list` shows ...". */
export interface RequestOptions {
  query?: Record<string, string | number | undefined>;
  body?: unknown;
  notFound?: (message: string) => string;
  /** Answer null instead of failing on 404 (the caller looks something up). */
  allow404?: boolean;
  auth?: boolean;
}

interface ErrorBody {
  error?: string;
  message?: string;
}

const NETWORK_CODES = new Set([
  'ECONNREFUSED', 'ENOTFOUND', 'EAI_AGAIN', 'ECONNRESET', 'EHOSTUNREACH', 'ENETUNREACH', 'ETIMEDOUT', 'EPIPE',
  'UND_ERR_CONNECT_TIMEOUT', 'UND_ERR_SOCKET',
]);

function isNetworkError(err: unknown): boolean {
  for (let e = err as { code?: string; cause?: unknown } | undefined, i = 0; e && i < 5; e = e.cause as typeof e, i++) {
    if (e.code && NETWORK_CODES.has(e.code)) return true;
  }
  return false;
}

/** The most telling part of a network failure: a known errno code, else the innermost message. */
function networkReason(err: unknown): string {
  let innermost = (err as Error)?.message ?? String(err);
  for (let e = err as { code?: string; message?: string; cause?: unknown } | undefined, i = 0; e && i < 5; e = e.cause as typeof e, i++) {
    if (e.code && NETWORK_CODES.has(e.code)) return e.code;
    if (e.message) innermost = e.message;
  }
  return innermost;
}

export class ApiClient {
  constructor(readonly options: ApiClientOptions) {}

  get server(): string {
    return this.options.server;
  }

  private url(path: string, query?: RequestOptions['query']): URL {
    const url = new URL(`${this.options.server}/api/v1${path}`);
    for (const [k, v] of Object.entries(query ?? {})) if (v !== undefined) url.searchParams.set(k, String(v));
    return url;
  }

  private headers(auth: boolean): Record<string, string> {
    if (!auth) return {};
    if (!this.options.token) {
      throw new CtlError(
        `no API token: pass --token or set KERNEX_TOKEN (a controller running here writes one to ${this.options.credentialsFile})`,
        EXIT.auth,
      );
    }
    return { authorization: `Bearer ${this.options.token}` };
  }

  unreachable(err: unknown): CtlError {
    return new CtlError(
      `cannot reach the controller at ${this.options.server} (${networkReason(err)}): is it running? Point kernexctl at it with --server or KERNEX_SERVER`,
      EXIT.unreachable, { cause: err },
    );
  }

  /** The error for a non-2xx answer. */
  failure(status: number, body: unknown, method: string, path: string, opts: RequestOptions = {}): CtlError {
    const b = (typeof body === 'object' && body !== null ? body : {}) as ErrorBody;
    const message = typeof b.message === 'string' ? b.message : typeof body === 'string' && body ? body.slice(0, 200) : `HTTP ${status}`;
    if (status === 401) {
      const fix = this.options.tokenSource === 'none'
        ? 'pass --token or set KERNEX_TOKEN'
        : `the token from ${this.options.tokenSource} is not valid here; pass a valid one with --token or KERNEX_TOKEN`;
      return new CtlError(`the controller refused the token (${message}): ${fix}`, EXIT.auth);
    }
    if (status === 403) return new CtlError(`not allowed: ${message}; use a token with the operator or admin role`, EXIT.auth);
    if (status === 404) {
      if (/^no route /.test(message)) {
        return new CtlError(
          `the controller at ${this.options.server} does not offer ${method} ${path.split('?')[0]}; it may be an older version: upgrade it`,
          EXIT.usage,
        );
      }
      return new CtlError(opts.notFound ? opts.notFound(message) : message, EXIT.usage);
    }
    if (status === 503) return new CtlError(`the controller is unavailable: ${message}`, EXIT.unreachable);
    if (status >= 500) return new CtlError(`the controller failed (${status}): ${message}`, EXIT.failed);
    return new CtlError(message, EXIT.usage);
  }

  async request<T>(method: string, path: string, opts: RequestOptions = {}): Promise<T> {
    const url = this.url(path, opts.query);
    const headers = this.headers(opts.auth ?? true);
    const init: RequestInit = { method, headers, signal: AbortSignal.timeout(REQUEST_TIMEOUT_MS) };
    if (opts.body !== undefined) {
      init.body = JSON.stringify(opts.body);
      headers['content-type'] = 'application/json';
    }
    const started = performance.now();
    let res: Response;
    try {
      res = await fetch(url, init);
    } catch (err) {
      if ((err as Error).name === 'TimeoutError') {
        throw new CtlError(`the controller at ${this.options.server} did not answer within ${REQUEST_TIMEOUT_MS / 1000} s`,
          EXIT.unreachable, { cause: err });
      }
      throw this.unreachable(err);
    }
    const text = await res.text();
    this.options.trace?.(`${method} ${url.pathname}${url.search} → ${res.status} (${Math.round(performance.now() - started)} ms)`);
    let body: unknown = text;
    try {
      body = text ? JSON.parse(text) : null;
    } catch {
      // not JSON: keep the text for the message
    }
    if (res.status === 404 && opts.allow404) return null as T;
    if (!res.ok) throw this.failure(res.status, body, method, path, opts);
    if (typeof body !== 'object' || body === null) {
      throw new CtlError(`unexpected answer from ${method} ${path}: not a JSON document; is ${this.options.server} a Kernex controller?`,
        EXIT.failed);
    }
    return body as T;
  }

  get<T>(path: string, opts?: RequestOptions): Promise<T> {
    return this.request<T>('GET', path, opts);
  }

  post<T>(path: string, body: unknown, opts?: RequestOptions): Promise<T> {
    return this.request<T>('POST', path, { ...opts, body });
  }

  put<T>(path: string, body: unknown, opts?: RequestOptions): Promise<T> {
    return this.request<T>('PUT', path, { ...opts, body });
  }

  /**
   * Streams a bundle file as multipart/form-data (never whole in memory),
   * reporting bytes handed to the socket as they go.
   */
  async upload(
    file: string, filename: string, onProgress?: (sent: number, total: number) => void, signature?: string,
  ): Promise<Bundle> {
    const { size } = await stat(file);
    const boundary = `----kernexctl-${randomBytes(12).toString('hex')}`;
    const safeName = filename.replace(/["\r\n\\]/g, '_');
    const head = Buffer.from(
      `--${boundary}\r\nContent-Disposition: form-data; name="file"; filename="${safeName}"\r\n` +
        'Content-Type: application/gzip\r\n\r\n',
    );
    const tail = Buffer.from(`\r\n--${boundary}--\r\n`);
    const url = this.url('/bundles');
    const headers = {
      ...this.headers(true),
      'content-type': `multipart/form-data; boundary=${boundary}`,
      'content-length': String(head.length + size + tail.length),
      // A detached Ed25519 signature travels with the bundle, into every command for it.
      ...(signature ? { 'x-kernex-signature': signature } : {}),
    };
    const started = performance.now();
    const { status, text } = await new Promise<{ status: number; text: string }>((resolve, reject) => {
      const req = (url.protocol === 'https:' ? https : http).request(url, { method: 'POST', headers });
      // Idle, not total: a large upload that keeps moving is never cut off.
      req.setTimeout(REQUEST_TIMEOUT_MS, () =>
        req.destroy(Object.assign(new Error(`no progress for ${REQUEST_TIMEOUT_MS / 1000} s`), { code: 'ETIMEDOUT' })));
      let answered = false;
      req.on('response', (res) => {
        answered = true;
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, text: Buffer.concat(chunks).toString('utf8') }));
        res.on('error', reject);
      });
      async function* body() {
        yield head;
        let sent = 0;
        onProgress?.(0, size);
        for await (const chunk of createReadStream(file, { highWaterMark: 256 * 1024 })) {
          sent += (chunk as Buffer).length;
          yield chunk as Buffer;
          onProgress?.(sent, size);
        }
        yield tail;
      }
      pipeline(Readable.from(body()), req).catch((err: Error) => {
        // The controller may answer (e.g. 413) and close before the body is
        // all sent: its answer says more than the broken pipe.
        if (!answered) reject(err);
      });
    }).catch((err: unknown) => {
      if (isNetworkError(err)) throw this.unreachable(err);
      throw new CtlError(`upload of ${file} failed: ${(err as Error).message}`, EXIT.failed, { cause: err });
    });
    this.options.trace?.(`POST ${url.pathname} (${size} bytes) → ${status} (${Math.round(performance.now() - started)} ms)`);
    let body: unknown = text;
    try {
      body = JSON.parse(text);
    } catch {
      // keep the text
    }
    if (status < 200 || status >= 300) throw this.failure(status, body, 'POST', '/bundles');
    return body as Bundle;
  }
}
