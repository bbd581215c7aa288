// The controller as its own process (`kernex server`), so a test can SIGKILL
// or SIGTERM it and start it again on the same data dir and ports.
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtemp, readFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Credentials } from '../../controller/services/tokens.js';
import { KERNEX_BIN } from './agent.js';
import { ApiClient, waitFor } from './controller.js';
import { freePort } from './ports.js';

export interface ControllerProcess {
  dataDir: string;
  httpPort: number;
  mqttPort: number;
  httpUrl: string;
  mqttUrl: string;
  creds: Credentials;
  api: ApiClient;
  readonly child: ChildProcess;
  /** Everything the current process wrote (JSON log lines). */
  output(): string;
  /** Sends `signal` and resolves with how the process ended. */
  kill(signal: NodeJS.Signals): Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  /** Starts it again on the same data dir and ports. */
  restart(): Promise<void>;
}

export interface ControllerProcessOptions {
  /** Default: a new temporary one. */
  dataDir?: string;
  /** Fixed ports (a load balancer in front, or a successor process); default: free ones. */
  httpPort?: number;
  mqttPort?: number;
  env?: Record<string, string>;
}

export async function startControllerProcess(opts: ControllerProcessOptions = {}): Promise<ControllerProcess> {
  const dataDir = opts.dataDir ?? (await mkdtemp(join(tmpdir(), 'kernex-ctlproc-')));
  const fixedPorts = opts.httpPort !== undefined || opts.mqttPort !== undefined;
  let [httpPort, mqttPort] = [opts.httpPort ?? (await freePort()), opts.mqttPort ?? (await freePort())];
  let child!: ChildProcess;
  let out = '';
  let exited!: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;

  const launch = async () => {
    out = '';
    child = spawn(process.execPath, [
      KERNEX_BIN, 'server', '--data-dir', dataDir, '--http-port', String(httpPort), '--mqtt-port', String(mqttPort),
      '--host', '127.0.0.1', '--log-level', 'debug',
    ], {
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { ...process.env, KERNEX_LOG_JSON: '1', KERNEX_HEARTBEAT_FLUSH_MS: '100', KERNEX_SWEEP_INTERVAL_MS: '200', ...opts.env },
    });
    const proc = child;
    proc.stdout!.on('data', (d: Buffer) => (out += d.toString()));
    proc.stderr!.on('data', (d: Buffer) => (out += d.toString()));
    exited = new Promise((resolve) => proc.once('exit', (code, signal) => resolve({ code, signal })));
    try {
      // Listening, and the credentials written: the line it logs once started.
      await waitFor(() => {
        if (proc.exitCode !== null || proc.signalCode !== null) throw new Error(`controller exited:\n${out}`);
        return out.includes('listening: REST');
      }, 'the controller process to start', 20_000, 50);
    } catch (err) {
      proc.kill('SIGKILL');
      throw err;
    }
  };

  // A port the kernel just called free can be taken before the controller binds
  // it (another test's outgoing connection): pick others and start again. A
  // restart keeps its ports, as a restarted server would.
  for (let attempt = 1; ; attempt++) {
    try {
      await launch();
      break;
    } catch (err) {
      if (fixedPorts || attempt === 3 || !/EADDRINUSE/.test((err as Error).message)) throw err;
      [httpPort, mqttPort] = [await freePort(), await freePort()];
    }
  }
  const httpUrl = `http://127.0.0.1:${httpPort}`;
  const creds = JSON.parse(await readFile(join(dataDir, 'credentials.json'), 'utf8')) as Credentials;
  return {
    dataDir, httpPort, mqttPort, httpUrl, mqttUrl: `mqtt://127.0.0.1:${mqttPort}`, creds,
    api: new ApiClient(httpUrl, creds.token),
    get child() {
      return child;
    },
    output: () => out,
    async kill(signal) {
      if (child.exitCode === null && child.signalCode === null) child.kill(signal);
      return exited;
    },
    restart: launch,
  };
}
