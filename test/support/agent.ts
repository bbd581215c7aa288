// Runs the real agent executable (`kernex agent`) as a child process.
import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtemp } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';

export const KERNEX_BIN = resolve('dist/cli/kernex.js');

export interface AgentProcess {
  deviceId: string;
  dataDir: string;
  child: ChildProcess;
  /** How the process ended. */
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  output(): string;
  stop(signal?: NodeJS.Signals): Promise<number | null>;
}

export async function startAgentProcess(opts: {
  deviceId: string;
  server: string;
  enrollmentToken: string;
  dataDir?: string;
  pollingInterval?: number;
  extraArgs?: string[];
  env?: Record<string, string>;
}): Promise<AgentProcess> {
  const dataDir = opts.dataDir ?? (await mkdtemp(join(tmpdir(), `kernex-agent-${opts.deviceId}-`)));
  const child = spawn(process.execPath, [
    KERNEX_BIN, 'agent', '--device-id', opts.deviceId, '--server', opts.server, '--enrollment-token', opts.enrollmentToken,
    '--data-dir', dataDir, '--polling-interval', String(opts.pollingInterval ?? 1), '--log-level', 'debug',
    ...(opts.extraArgs ?? []),
  ], { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, KERNEX_LOG_JSON: '1', ...opts.env } });
  let out = '';
  child.stdout!.on('data', (d: Buffer) => (out += d.toString()));
  child.stderr!.on('data', (d: Buffer) => (out += d.toString()));
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((r) =>
    child.once('exit', (code, signal) => r({ code, signal })));
  return {
    deviceId: opts.deviceId,
    dataDir,
    child,
    exited,
    output: () => out,
    async stop(signal: NodeJS.Signals = 'SIGTERM') {
      if (child.exitCode !== null || child.signalCode !== null) return child.exitCode;
      child.kill(signal);
      return (await exited).code;
    },
  };
}
