// The receiving side of the fan-out benchmark, spread over child processes
// (bench/receiver.ts), each holding a slice of the simulated fleet. In one
// process, 10,000 sockets are read one after another by one event loop, and
// the last device's receipt time was mostly the time that loop took to
// handle the other 9,999 messages (about 0.1 ms each here), whichever broker
// sent them. Both brokers are measured with the same receiving processes.
import { fork, type ChildProcess } from 'node:child_process';
import { join, resolve } from 'node:path';
import type { BrokerTarget, DeviceCredentials } from '../../sim/index.js';
import { Latency, wallUs } from '../../sim/index.js';
import { isReply, type Reply, type Request } from './receiver-protocol.js';

const ENTRY = join(resolve(new URL('..', import.meta.url).pathname), 'receiver.js');

type Op = Request extends infer R ? (R extends { id: number } ? Omit<R, 'id'> : never) : never;

class Receiver {
  private nextId = 1;
  private readonly waiting = new Map<number, { resolve: (v: unknown) => void; reject: (e: Error) => void }>();
  private exited: Error | undefined;

  constructor(readonly child: ChildProcess, readonly index: number) {
    child.on('message', (m: unknown) => {
      if (!isReply(m)) return;
      this.settle(m);
    });
    child.on('exit', (code, signal) => {
      this.exited = new Error(`fan-out receiver ${index} exited (${code ?? signal})`);
      for (const w of this.waiting.values()) w.reject(this.exited);
      this.waiting.clear();
    });
  }

  private settle(m: Reply): void {
    const w = this.waiting.get(m.id);
    if (!w) return;
    this.waiting.delete(m.id);
    if (m.error !== undefined) w.reject(new Error(`fan-out receiver ${this.index}: ${m.error}`));
    else w.resolve(m.result);
  }

  call<T>(op: Op): Promise<T> {
    if (this.exited) return Promise.reject(this.exited);
    const id = this.nextId++;
    return new Promise<T>((resolve, reject) => {
      this.waiting.set(id, { resolve: resolve as (v: unknown) => void, reject });
      this.child.send({ ...op, id });
    });
  }
}

export interface ReceiverConnectReport {
  connected: number;
  failed: number;
  firstError?: string;
}

export class ReceiverPool {
  /** Largest |clock offset| bound seen between this process and a receiver, µs (half the IPC round trip). */
  clockUncertaintyUs = 0;

  private constructor(private readonly receivers: Receiver[], private readonly credentials: DeviceCredentials[]) {}

  /** Device i lives in process i % processes. */
  static async start(credentials: DeviceCredentials[], opts: { server: string; processes: number }): Promise<ReceiverPool> {
    const n = Math.max(1, Math.min(opts.processes, credentials.length));
    const receivers = Array.from({ length: n }, (_, k) => new Receiver(fork(ENTRY, [], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] }), k));
    const pool = new ReceiverPool(receivers, credentials);
    try {
      await Promise.all(receivers.map((r, k) =>
        r.call({ op: 'init', server: opts.server, credentials: credentials.filter((_, i) => i % n === k) })));
      await pool.checkClocks();
    } catch (err) {
      await pool.stop();
      throw err;
    }
    return pool;
  }

  get processes(): number {
    return this.receivers.length;
  }

  /**
   * Receipt times are the receivers' wall clock, read from the same system
   * clock as ours; a round trip bounds how far apart they could appear.
   */
  private async checkClocks(): Promise<void> {
    for (const r of this.receivers) {
      const before = wallUs();
      const theirs = await r.call<number>({ op: 'clock' });
      const after = wallUs();
      const offset = Math.abs(theirs - (before + after) / 2);
      this.clockUncertaintyUs = Math.max(this.clockUncertaintyUs, Math.round(Math.max(offset, (after - before) / 2)));
    }
  }

  async connect(target: BrokerTarget): Promise<ReceiverConnectReport> {
    const reports = await Promise.all(this.receivers.map((r) =>
      r.call<{ connected: number; failed: number; firstError: string | null }>({ op: 'connect', target })));
    return {
      connected: reports.reduce((a, r) => a + r.connected, 0),
      failed: reports.reduce((a, r) => a + r.failed, 0),
      firstError: reports.find((r) => r.firstError)?.firstError ?? undefined,
    };
  }

  /** The next round goes to the first `size` devices; '*' while the command id is not known yet. */
  async arm(size: number, commandId = '*'): Promise<void> {
    const n = this.receivers.length;
    await Promise.all(this.receivers.map((r, k) =>
      r.call({ op: 'arm', commandId, expect: Math.floor(size / n) + (k < size % n ? 1 : 0) })));
  }

  /** Waits for every armed device's receipt; latencies from `t0` (wall-clock µs). */
  async collect(t0: number, timeoutMs: number): Promise<{ got: number; latency: Latency }> {
    const parts = await Promise.all(this.receivers.map((r) => r.call<{ at: number[] }>({ op: 'collect', timeoutMs })));
    const latency = new Latency();
    let got = 0;
    for (const p of parts) {
      for (const at of p.at) latency.record(at - t0);
      got += p.at.length;
    }
    return { got, latency };
  }

  /** Every device reports success for the commands it noted (clears a Kernex deployment). */
  async settle(): Promise<void> {
    await Promise.all(this.receivers.map((r) => r.call({ op: 'settle' })));
  }

  /** Disconnects every device (the processes stay, for the next broker). */
  async end(): Promise<void> {
    await Promise.all(this.receivers.map((r) => r.call({ op: 'end' })));
  }

  async stop(): Promise<void> {
    await Promise.all(this.receivers.map((r) => new Promise<void>((done) => {
      if (r.child.exitCode !== null || r.child.signalCode !== null) return done();
      r.child.once('exit', () => done());
      r.child.disconnect();
      setTimeout(() => r.child.kill('SIGKILL'), 5000).unref();
    })));
  }

  get size(): number {
    return this.credentials.length;
  }
}
