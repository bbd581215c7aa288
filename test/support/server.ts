// Runs the real controller executable (`kernex server`) as a child process, for
// tests that restart it, kill it, or run several of it.
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtemp, readFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { KERNEX_BIN } from './agent.js';
import { ApiClient, waitFor } from './controller.js';
import { freePort } from './ports.js';
import type { Credentials } from '../../controller/services/tokens.js';

export interface ServerProcess {
  dataDir: string;
  httpPort: number;
  mqttPort: number;
  httpUrl: string;
  mqttUrl: string;
  child: ChildProcess;
  creds: Credentials;
  api: ApiClient;
  output(): string;
  /** SIGTERM: a clean stop. SIGKILL: a crash. */
  stop(signal?: NodeJS.Signals): Promise<number | null>;
}

export interface ServerOptions {
  dataDir?: string;
  /** Fixed ports, so a restarted server is found where it was. Default: free ones. */
  httpPort?: number;
  mqttPort?: number;
  env?: Record<string, string>;
  /** Where the admin credentials come from when this server's data dir has none. */
  creds?: Credentials;
}

export async function startServerProcess(opts: ServerOptions = {}): Promise<ServerProcess> {
  // Free ports can be taken by another process before the server binds them;
  // with ports of its own choosing, a start that lost that race tries new ones.
  for (let attempt = 1; ; attempt++) {
    try {
      return await startOnce(opts);
    } catch (err) {
      const fixed = opts.httpPort !== undefined || opts.mqttPort !== undefined;
      if (fixed || attempt >= 3 || !/EADDRINUSE/.test((err as Error).message)) throw err;
    }
  }
}

async function startOnce(opts: ServerOptions): Promise<ServerProcess> {
  const dataDir = opts.dataDir ?? (await mkdtemp(join(tmpdir(), 'kernex-server-')));
  const httpPort = opts.httpPort ?? (await freePort());
  const mqttPort = opts.mqttPort ?? (await freePort());
  const child = spawn(process.execPath, [
    KERNEX_BIN, 'server', '--data-dir', dataDir, '--http-port', String(httpPort), '--mqtt-port', String(mqttPort),
    '--host', '127.0.0.1', '--log-level', 'debug',
  ], {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, KERNEX_LOG_JSON: '1', KERNEX_HEARTBEAT_FLUSH_MS: '100', ...opts.env },
  });
  let out = '';
  child.stdout!.on('data', (d: Buffer) => (out += d.toString()));
  child.stderr!.on('data', (d: Buffer) => (out += d.toString()));
  const exited = new Promise<number | null>((r) => child.once('exit', (code) => r(code)));
  await waitFor(() => {
    if (child.exitCode !== null) throw new Error(`kernex server exited with ${child.exitCode}:\n${out}`);
    return out.includes('listening: REST');
  }, `kernex server on ${httpPort}/${mqttPort}`, 20_000).catch((err: Error) => {
    child.kill('SIGKILL');
    throw new Error(`${err.message}\nserver output:\n${out}`);
  });
  const creds = opts.creds ?? (JSON.parse(await readFile(join(dataDir, 'credentials.json'), 'utf8')) as Credentials);
  const httpUrl = `http://127.0.0.1:${httpPort}`;
  return {
    dataDir, httpPort, mqttPort, httpUrl, mqttUrl: `mqtt://127.0.0.1:${mqttPort}`, child, creds,
    api: new ApiClient(httpUrl, creds.token),
    output: () => out,
    async stop(signal: NodeJS.Signals = 'SIGTERM') {
      if (child.exitCode !== null || child.signalCode !== null) return child.exitCode;
      child.kill(signal);
      return exited;
    },
  };
}
