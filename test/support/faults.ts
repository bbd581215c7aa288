// Helpers for the fault tests: bundles whose scripts leave traces a test can
// read back, the agent's state file, and process checks through /proc.
import { randomBytes } from 'node:crypto';
import { readFile, readdir } from 'node:fs/promises';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import pino, { type Logger } from 'pino';
import type { BundleSpec } from './bundles.js';
import type { AgentState } from '../../agent/state.js';

/**
 * A bundle whose deploy script appends `start <version>` to $KERNEX_TEST_OUT,
 * records its pids in $KERNEX_TEST_OUT.pids, sleeps $KERNEX_TEST_SLEEP seconds
 * (0 when unset) in a child process, then appends `deploy <version>`. The
 * payload is random (incompressible), so a download takes several chunks.
 */
export function traceBundle(version: string, opts: { idempotent?: boolean; payloadBytes?: number; exit?: number } = {}): BundleSpec {
  const script = [
    '#!/bin/sh',
    `echo "start ${version}" >> "$KERNEX_TEST_OUT"`,
    'echo $$ >> "$KERNEX_TEST_OUT.pids"',
    'sleep "${KERNEX_TEST_SLEEP:-0}" &',
    'echo $! >> "$KERNEX_TEST_OUT.pids"',
    'wait',
    `echo "deploy ${version}" >> "$KERNEX_TEST_OUT"`,
    `echo "deployed ${version}"`,
    `exit ${opts.exit ?? 0}`,
    '',
  ].join('\n');
  return {
    manifest: { name: 'trace-app', version, deploy: { script: 'deploy.sh', ...(opts.idempotent ? { idempotent: true } : {}) } },
    files: {
      'deploy.sh': script,
      'payload/blob.txt': randomBytes(opts.payloadBytes ?? 192 * 1024).toString('base64'),
    },
  };
}

export async function agentState(dataDir: string): Promise<AgentState> {
  return JSON.parse(await readFile(join(dataDir, 'state.json'), 'utf8')) as AgentState;
}

export async function readLines(file: string): Promise<string[]> {
  try {
    return (await readFile(file, 'utf8')).split('\n').filter(Boolean);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return [];
    throw err;
  }
}

/** Whether a process can still run (a zombie cannot: it only waits to be reaped). */
export async function processRunning(pid: number): Promise<boolean> {
  try {
    const stat = await readFile(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2).split(' ')[0] !== 'Z';
  } catch {
    return false;
  }
}

/** Live (non-zombie) processes whose process group is `pgid`. */
export async function groupMembers(pgid: number): Promise<number[]> {
  const members: number[] = [];
  for (const name of await readdir('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    try {
      const stat = await readFile(`/proc/${name}/stat`, 'utf8');
      const [state, , pgrp] = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
      if (Number(pgrp) === pgid && state !== 'Z') members.push(Number(name));
    } catch {
      // gone meanwhile
    }
  }
  return members;
}

/** A pino logger whose lines the test can read back (the controller in-process logs through it). */
export function capturingLogger(level = 'debug'): { logger: Logger; lines: () => Array<Record<string, unknown>> } {
  const lines: Array<Record<string, unknown>> = [];
  const stream = new Writable({
    write(chunk: Buffer, _enc, done) {
      for (const line of chunk.toString().split('\n')) if (line) lines.push(JSON.parse(line) as Record<string, unknown>);
      done();
    },
  });
  return { logger: pino({ level }, stream), lines: () => lines };
}

/** A bundle whose deploy script waits until the file $KERNEX_TEST_GATE exists, then appends `deploy <version>` to $KERNEX_TEST_OUT. */
export function gatedBundle(version: string): BundleSpec {
  return {
    manifest: { name: 'gated-app', version, deploy: { script: 'deploy.sh' } },
    files: {
      'deploy.sh': [
        '#!/bin/sh',
        `echo "start ${version}" >> "$KERNEX_TEST_OUT"`,
        'while [ ! -f "$KERNEX_TEST_GATE" ]; do sleep 0.05; done',
        `echo "deploy ${version}" >> "$KERNEX_TEST_OUT"`,
        '',
      ].join('\n'),
    },
  };
}
