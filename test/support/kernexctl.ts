// Runs the real `kernexctl` executable (dist/cli/kernexctl.js) as an operator would.
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { resolve } from 'node:path';

export const KERNEXCTL_BIN = resolve('dist/cli/kernexctl.js');

export interface CtlResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** The environment without any KERNEX_* the developer may have set, plus `env`. */
export function ctlEnv(env: Record<string, string | undefined> = {}): NodeJS.ProcessEnv {
  const clean: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(process.env)) if (!k.startsWith('KERNEX_') && k !== 'NO_COLOR') clean[k] = v;
  for (const [k, v] of Object.entries(env)) if (v !== undefined) clean[k] = v;
  return clean;
}

export function kernexctl(args: string[], opts: { env?: Record<string, string | undefined>; cwd?: string; timeoutMs?: number } = {}): Promise<CtlResult> {
  return new Promise((resolveRun) => {
    execFile(process.execPath, [KERNEXCTL_BIN, ...args], {
      env: ctlEnv(opts.env), cwd: opts.cwd, timeout: opts.timeoutMs ?? 60_000, maxBuffer: 16 * 1024 * 1024,
    }, (err, stdout, stderr) => {
      const code = err ? (typeof (err as { code?: unknown }).code === 'number' ? (err as { code: number }).code : null) : 0;
      resolveRun({ code, stdout, stderr });
    });
  });
}

/** A long-running kernexctl (watch, deploy --wait) whose output is read as it comes. */
export interface CtlProcess {
  child: ChildProcess;
  stdout(): string;
  stderr(): string;
  /** Ends it with `signal` and resolves its exit code. */
  stop(signal?: NodeJS.Signals): Promise<number | null>;
  exited: Promise<number | null>;
}

export function spawnKernexctl(args: string[], opts: { env?: Record<string, string | undefined> } = {}): CtlProcess {
  const child = spawn(process.execPath, [KERNEXCTL_BIN, ...args], { env: ctlEnv(opts.env), stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  child.stdout!.on('data', (d: Buffer) => (out += d.toString()));
  child.stderr!.on('data', (d: Buffer) => (err += d.toString()));
  const exited = new Promise<number | null>((r) => child.once('exit', (code) => r(code)));
  return {
    child,
    stdout: () => out,
    stderr: () => err,
    exited,
    async stop(signal: NodeJS.Signals = 'SIGINT') {
      if (child.exitCode === null && child.signalCode === null) child.kill(signal);
      return exited;
    },
  };
}

/** Parses each non-empty line as JSON (NDJSON). */
export function jsonLines<T = Record<string, unknown>>(text: string): T[] {
  return text.split('\n').filter((l) => l.trim()).map((l) => JSON.parse(l) as T);
}
