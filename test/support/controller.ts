// Starts a real controller on ephemeral ports with its own data dir.
import { mkdtemp, readFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import pino, { type Logger } from 'pino';
import {
  loadControllerConfig, startController, type Controller, type ControllerDeps, type ControllerFlags,
} from '../../controller/index.js';
import type { Credentials } from '../../controller/services/tokens.js';

export interface TestController {
  controller: Controller;
  dataDir: string;
  creds: Credentials;
  api: ApiClient;
  stop(): Promise<void>;
}

export async function startTestController(
  overrides: ControllerFlags = {}, logger?: Logger, deps: ControllerDeps = {},
): Promise<TestController> {
  const dataDir = overrides.dataDir ?? (await mkdtemp(join(tmpdir(), 'kernex-ctl-')));
  const config = loadControllerConfig(
    // No Swagger UI in-process: its static-file plugin require()s an ES module,
    // which jest's loader cannot do on Node 20 (test/openapi.test.ts checks
    // the UI on a real `kernex server` process).
    { httpHost: '127.0.0.1', mqttHost: '127.0.0.1', httpPort: 0, mqttPort: 0, heartbeatFlushMs: 100, docsUi: false, ...overrides, dataDir },
    {},
  );
  const controller = await startController(config, logger ?? pino({ level: process.env.KERNEX_TEST_LOG ?? 'silent' }), deps);
  const creds = JSON.parse(await readFile(controller.credentialsFile, 'utf8')) as Credentials;
  return { controller, dataDir, creds, api: new ApiClient(controller.httpUrl, creds.token), stop: () => controller.stop() };
}

export interface ApiResponse<T = any> {
  status: number;
  body: T;
  headers: Headers;
}

/** A thin REST client, as an operator's script would use the API. */
export class ApiClient {
  constructor(readonly base: string, readonly token?: string) {}

  withToken(token: string | undefined): ApiClient {
    return new ApiClient(this.base, token);
  }

  async request<T = any>(method: string, path: string, body?: unknown, headers: Record<string, string> = {}): Promise<ApiResponse<T>> {
    const init: RequestInit = { method, headers: { ...headers } };
    if (this.token) (init.headers as Record<string, string>).authorization = `Bearer ${this.token}`;
    if (body instanceof FormData) init.body = body;
    else if (typeof body === 'string') {
      init.body = body;
      (init.headers as Record<string, string>)['content-type'] ??= 'application/json';
    } else if (body !== undefined) {
      init.body = JSON.stringify(body);
      (init.headers as Record<string, string>)['content-type'] = 'application/json';
    }
    const res = await fetch(`${this.base}/api/v1${path}`, init);
    const text = await res.text();
    let parsed: unknown = text;
    try {
      parsed = JSON.parse(text);
    } catch {
      // not JSON: keep the text
    }
    return { status: res.status, body: parsed as T, headers: res.headers };
  }

  get<T = any>(path: string) {
    return this.request<T>('GET', path);
  }

  post<T = any>(path: string, body?: unknown) {
    return this.request<T>('POST', path, body);
  }

  put<T = any>(path: string, body?: unknown) {
    return this.request<T>('PUT', path, body);
  }

  async upload<T = any>(file: Buffer, filename = 'bundle.tar.gz') {
    const form = new FormData();
    form.append('file', new Blob([file]), filename);
    return this.request<T>('POST', '/bundles', form);
  }
}

/** Polls `check` until it returns a truthy value, or fails with `what`. */
export async function waitFor<T>(check: () => Promise<T | undefined | null | false> | T | undefined | null | false,
  what: string, timeoutMs = 20_000, everyMs = 50): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  let last: unknown;
  for (;;) {
    try {
      const value = await check();
      if (value) return value;
    } catch (err) {
      last = err;
    }
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}${last ? `: ${(last as Error).message}` : ''}`);
    await new Promise((r) => setTimeout(r, everyMs));
  }
}
