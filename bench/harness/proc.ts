// Resource figures of another process, read from /proc (Linux).
import { readFileSync } from 'node:fs';

export interface ProcSample {
  /** Resident set size, bytes. */
  rss: number;
  /** User + system CPU time consumed so far, seconds. */
  cpuSeconds: number;
  at: number;
}

const TICKS_PER_SECOND = 100; // USER_HZ on Linux

export function sampleProcess(pid: number): ProcSample {
  const status = readFileSync(`/proc/${pid}/status`, 'utf8');
  const rssKb = Number(/VmRSS:\s+(\d+)/.exec(status)?.[1] ?? 0);
  // Fields after the command name (which may contain spaces, hence the last ')').
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  const utime = Number(fields[11]);
  const stime = Number(fields[12]);
  return { rss: rssKb * 1024, cpuSeconds: (utime + stime) / TICKS_PER_SECOND, at: performance.now() };
}

/** CPU use between two samples, in percent of one core. */
export function cpuPercent(a: ProcSample, b: ProcSample): number {
  const wall = (b.at - a.at) / 1000;
  return wall > 0 ? ((b.cpuSeconds - a.cpuSeconds) / wall) * 100 : 0;
}

/** This process's open-file limit (soft), from /proc/self/limits. */
export function openFileLimit(): number {
  try {
    const m = /Max open files\s+(\d+)/.exec(readFileSync('/proc/self/limits', 'utf8'));
    if (m) return Number(m[1]);
  } catch {
    // not Linux
  }
  return 1024;
}

export const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));
