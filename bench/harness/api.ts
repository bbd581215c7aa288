// The REST calls an operator makes during a benchmark, with the admin token.
import * as tar from 'tar';
import { mkdtemp, readFile, rm, writeFile, chmod } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

export class Api {
  constructor(readonly base: string, private readonly token: string) {}

  async request<T>(method: string, path: string, body?: unknown): Promise<T> {
    const headers: Record<string, string> = { authorization: `Bearer ${this.token}` };
    let payload: RequestInit['body'];
    if (body instanceof FormData) payload = body;
    else if (body !== undefined) {
      payload = JSON.stringify(body);
      headers['content-type'] = 'application/json';
    }
    const res = await fetch(`${this.base}/api/v1${path}`, { method, headers, body: payload });
    const text = await res.text();
    if (!res.ok) throw new Error(`${method} ${path}: HTTP ${res.status} ${text.slice(0, 500)}`);
    return JSON.parse(text) as T;
  }

  get<T>(path: string): Promise<T> {
    return this.request<T>('GET', path);
  }

  post<T>(path: string, body: unknown): Promise<T> {
    return this.request<T>('POST', path, body);
  }

  async upload(file: Buffer): Promise<{ id: string; version: string; sha256: string; size: number }> {
    const form = new FormData();
    form.append('file', new Blob([file]), 'bundle.tar.gz');
    return this.request('POST', '/bundles', form);
  }

  /** Devices the API shows online (the controller's own view, buffered presence included). */
  async onlineCount(): Promise<number> {
    const list = await this.get<Array<{ status: string }>>('/devices?status=online&limit=100000');
    return list.length;
  }
}

/** A real bundle whose deploy script does nothing but succeed. */
export async function noopBundle(version: string): Promise<Buffer> {
  const dir = await mkdtemp(join(tmpdir(), 'kernex-bench-bundle-'));
  try {
    await writeFile(join(dir, 'manifest.json'), JSON.stringify({ name: 'bench-noop', version, deploy: { script: 'deploy.sh' } }));
    await writeFile(join(dir, 'deploy.sh'), '#!/bin/sh\nexit 0\n');
    await chmod(join(dir, 'deploy.sh'), 0o755);
    const out = join(dir, 'bundle.tar.gz');
    await tar.c({ gzip: true, file: out, cwd: dir, portable: true }, ['manifest.json', 'deploy.sh']);
    return await readFile(out);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}
