// Runs a bundle's deploy or rollback script and reports what the controller
// needs (exit code, output tail, duration). The script gets its own process
// group so a timeout can take down everything it started, not just the shell.
import { spawn, type ChildProcess } from 'node:child_process';
import { constants } from 'node:fs';
import fs from 'node:fs/promises';
import { StringDecoder } from 'node:string_decoder';
import { setTimeout as delay } from 'node:timers/promises';
import { resolveBundlePath } from './extract.js';

export interface RunScriptOptions {
  bundleDir: string;
  /** Path relative to bundleDir, as in the manifest. */
  script: string;
  timeoutSeconds: number;
  /** Added to the agent's environment. */
  env?: Record<string, string>;
  /** Output as it arrives, stdout and stderr interleaved. */
  onOutput?: (chunk: string) => void;
  /**
   * Called once the script runs, with its pid (= its process group id), e.g. to
   * record it durably. Awaited before the result is returned; if it throws, the
   * script's group is killed (a script nobody can track must not run on).
   */
  onSpawn?: (pid: number) => Promise<void> | void;
  /** Aborting ends the script like a timeout does (TERM, then KILL), with `aborted` set. */
  signal?: AbortSignal;
}

export interface ScriptResult {
  /** null when the script was ended by a signal. */
  exit_code: number | null;
  /** The last 4 KiB of stdout+stderr, cut on a character boundary. */
  output_tail: string;
  duration_seconds: number;
  timed_out: boolean;
  /** Ended because `signal` was aborted. */
  aborted: boolean;
  signal: string | null;
}

export const OUTPUT_TAIL_BYTES = 4096;
const KILL_GRACE_MS = 2000;
// After the script exits, how long to wait for output still in the pipes. A
// background process that kept the pipes open does not hold the result back.
const DRAIN_AFTER_EXIT_MS = 500;
const POLL_MS = 50;

/**
 * Runs `script` (resolved inside bundleDir; anything escaping is refused) with
 * cwd = bundleDir: directly if executable, else with /bin/sh. On timeout the
 * whole process group gets SIGTERM, then SIGKILL after a grace period. Resolves
 * for any exit status; rejects only if the script cannot be found or started.
 */
export async function runScript(opts: RunScriptOptions): Promise<ScriptResult> {
  if (!(opts.timeoutSeconds > 0)) throw new RangeError(`timeoutSeconds must be positive, got ${opts.timeoutSeconds}`);
  const cwd = await fs.realpath(opts.bundleDir);
  const script = await resolveBundlePath(cwd, opts.script, 'script');
  const env = { ...process.env, ...opts.env };

  let child: ChildProcess;
  if (await isExecutable(script)) {
    try {
      child = await start(script, [], cwd, env);
    } catch (err) {
      // An executable bit on a noexec mount: the shell can still read it.
      if ((err as NodeJS.ErrnoException).code !== 'EACCES') throw err;
      child = await start('/bin/sh', [script], cwd, env);
    }
  } else {
    child = await start('/bin/sh', [script], cwd, env);
  }
  const result = supervise(child, opts);
  if (opts.onSpawn) {
    try {
      await opts.onSpawn(child.pid as number);
    } catch (err) {
      signalGroup(child.pid as number, 'SIGKILL');
      await result;
      throw err;
    }
  }
  return result;
}

function start(command: string, args: string[], cwd: string, env: NodeJS.ProcessEnv): Promise<ChildProcess> {
  return new Promise((resolve, reject) => {
    // detached: setsid(), so the script leads a process group we can signal as a whole.
    const child = spawn(command, args, { cwd, env, detached: true, stdio: ['ignore', 'pipe', 'pipe'] });
    child.once('spawn', () => resolve(child));
    child.once('error', reject);
  });
}

async function supervise(child: ChildProcess, opts: RunScriptOptions): Promise<ScriptResult> {
  const pid = child.pid as number; // set once 'spawn' has fired
  const startedAt = performance.now();
  const tail = new OutputTail(OUTPUT_TAIL_BYTES);
  const decoders = [new StringDecoder('utf8'), new StringDecoder('utf8')];
  const collect = (decoder: StringDecoder) => (chunk: Buffer) => {
    tail.push(chunk);
    const text = decoder.write(chunk);
    if (text && opts.onOutput) opts.onOutput(text);
  };
  child.stdout?.on('data', collect(decoders[0]));
  child.stderr?.on('data', collect(decoders[1]));
  child.on('error', () => undefined); // signalling errors are handled at the call site

  const exited = new Promise<[number | null, NodeJS.Signals | null]>((resolve) =>
    child.once('exit', (code, signal) => resolve([code, signal])));
  const closed = new Promise<void>((resolve) => child.once('close', () => resolve()));

  let timedOut = false;
  let aborted = false;
  let termSentAt = 0;
  let killTimer: NodeJS.Timeout | undefined;
  const end = () => {
    if (termSentAt) return;
    termSentAt = Date.now();
    signalGroup(pid, 'SIGTERM');
    // Also covers a script that traps SIGTERM and never exits.
    killTimer = setTimeout(() => signalGroup(pid, 'SIGKILL'), KILL_GRACE_MS);
  };
  const timer = setTimeout(() => {
    timedOut = true;
    end();
  }, opts.timeoutSeconds * 1000);
  const onAbort = () => {
    aborted = true;
    end();
  };
  if (opts.signal?.aborted) onAbort();
  else opts.signal?.addEventListener('abort', onAbort, { once: true });

  const [code, signal] = await exited;
  const duration = (performance.now() - startedAt) / 1000;
  clearTimeout(timer);
  opts.signal?.removeEventListener('abort', onAbort);
  if (termSentAt) {
    // Children the script left behind (`sleep 1000 &`) are in the same group.
    if (!(await groupGone(pid, termSentAt + KILL_GRACE_MS))) {
      signalGroup(pid, 'SIGKILL');
      await groupGone(pid, Date.now() + KILL_GRACE_MS);
    }
    clearTimeout(killTimer);
  }
  await Promise.race([closed, delay(DRAIN_AFTER_EXIT_MS, undefined, { ref: false })]);
  child.stdout?.destroy();
  child.stderr?.destroy();
  for (const decoder of decoders) {
    const rest = decoder.end();
    if (rest && opts.onOutput) opts.onOutput(rest);
  }

  return {
    exit_code: code,
    output_tail: tail.text(),
    duration_seconds: Math.round(duration * 1000) / 1000,
    timed_out: timedOut,
    aborted: aborted && !timedOut,
    signal,
  };
}

async function isExecutable(file: string): Promise<boolean> {
  try {
    await fs.access(file, constants.X_OK);
    return true;
  } catch {
    return false;
  }
}

function signalGroup(pgid: number, signal: NodeJS.Signals): void {
  try {
    process.kill(-pgid, signal);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ESRCH') throw err;
  }
}

/** Process ids in /proc; null where there is no /proc. */
async function listPids(): Promise<string[] | null> {
  if (process.platform !== 'linux') return null;
  try {
    return (await fs.readdir('/proc')).filter((name) => /^\d+$/.test(name));
  } catch {
    return null;
  }
}

/** State and process group of a process; null once it is gone. */
async function procStat(pid: string): Promise<{ state: string; pgrp: number } | null> {
  try {
    const stat = await fs.readFile(`/proc/${pid}/stat`, 'utf8');
    // "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
    const [state, , pgrp] = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return { state: state!, pgrp: Number(pgrp) };
  } catch {
    return null;
  }
}

/** Whether any process of the group can still run (zombies cannot, and hold nothing). */
async function groupAlive(pgid: number): Promise<boolean> {
  try {
    process.kill(-pgid, 0);
  } catch (err) {
    return (err as NodeJS.ErrnoException).code !== 'ESRCH';
  }
  // The group still "exists" while a killed member waits to be reaped by its new
  // parent, and PID 1 in a container often never reaps. Look closer where we can.
  const pids = await listPids();
  if (!pids) return true;
  const stats = await Promise.all(pids.map(procStat));
  return stats.some((s) => s !== null && s.pgrp === pgid && s.state !== 'Z');
}

/** TERM, a grace period, then KILL. */
async function endGroup(pgid: number): Promise<void> {
  signalGroup(pgid, 'SIGTERM');
  if (!(await groupGone(pgid, Date.now() + KILL_GRACE_MS))) {
    signalGroup(pgid, 'SIGKILL');
    await groupGone(pgid, Date.now() + KILL_GRACE_MS);
  }
}

/** Polls until no process of the group is left or the deadline passes. */
async function groupGone(pgid: number, deadline: number): Promise<boolean> {
  while (await groupAlive(pgid)) {
    if (Date.now() >= deadline) return false;
    await delay(POLL_MS);
  }
  return true;
}

/**
 * When the process started, in clock ticks since boot (/proc/<pid>/stat field
 * 22): with the pid it names one process, even once the pid number is reused.
 * Null where /proc is not available or the process is gone.
 */
export async function processStartTime(pid: number): Promise<number | null> {
  try {
    const stat = await fs.readFile(`/proc/${pid}/stat`, 'utf8');
    // Fields after "(comm) ": state is field 3, starttime field 22.
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    const ticks = Number(fields[19]);
    return Number.isFinite(ticks) ? ticks : null;
  } catch {
    return null;
  }
}

/**
 * Ends what is left of a script's process group after the agent itself was
 * killed (the script runs in its own session, so it outlives the agent). The
 * group is only signalled when it is provably the one recorded: its leader is
 * the same process (same start time), or the leader is gone and members are
 * left (Linux does not reuse a pid while a process group still carries it).
 * Resolves true when something was killed.
 */
export async function killLeftoverGroup(pgid: number, leaderStartTime: number | null): Promise<boolean> {
  if (!(await groupAlive(pgid))) return false;
  const leaderNow = await processStartTime(pgid);
  if (leaderNow !== null && leaderStartTime !== null && leaderNow !== leaderStartTime) return false; // a new process owns the number
  if (leaderNow !== null && leaderStartTime === null) return false; // cannot prove it is ours
  await endGroup(pgid);
  return true;
}

/**
 * Ends the process groups of every process whose environment holds the entry
 * `tag` (NAME=value): a script the agent started just before it was killed,
 * before it could record the script's process group. The tag is unique per
 * run, so nothing else carries it. Resolves the groups ended.
 */
export async function killTaggedGroups(tag: string): Promise<number[]> {
  const pids = await listPids();
  if (!pids) return [];
  const entry = Buffer.from(`\0${tag}\0`);
  const own = (await procStat(String(process.pid)))?.pgrp;
  const groups = new Set<number>();
  await Promise.all(pids.map(async (pid) => {
    let environ: Buffer;
    try {
      environ = await fs.readFile(`/proc/${pid}/environ`);
    } catch {
      return; // gone, or not ours to read
    }
    if (!Buffer.concat([Buffer.from('\0'), environ]).includes(entry)) return;
    const stat = await procStat(pid);
    if (stat && stat.state !== 'Z' && stat.pgrp !== own) groups.add(stat.pgrp);
  }));
  await Promise.all([...groups].map(endGroup));
  return [...groups];
}

/** Keeps the last `limit` bytes of a byte stream. */
class OutputTail {
  private chunks: Buffer[] = [];
  private length = 0;

  constructor(private readonly limit: number) {}

  push(chunk: Buffer): void {
    this.chunks.push(chunk);
    this.length += chunk.length;
    while (this.chunks.length > 1 && this.length - this.chunks[0].length >= this.limit) {
      this.length -= this.chunks[0].length;
      this.chunks.shift();
    }
  }

  text(): string {
    let buf = Buffer.concat(this.chunks);
    if (buf.length > this.limit) buf = buf.subarray(buf.length - this.limit);
    // Do not start in the middle of a multi-byte character: skip its continuation bytes.
    let skip = 0;
    while (skip < 3 && skip < buf.length && (buf[skip] & 0xc0) === 0x80) skip++;
    return buf.subarray(skip).toString('utf8');
  }
}
