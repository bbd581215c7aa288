// The processes under test, each started as a child on free loopback ports
// with its own data directory: the Kernex controller (`kernex server`), a
// bare Aedes broker, and Mosquitto.
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync } from 'node:fs';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { createConnection, createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import type { BrokerTarget } from '../../sim/index.js';
import { sampleProcess, sleep, type ProcSample } from './proc.js';

const DIST = resolve(new URL('../..', import.meta.url).pathname);
export const KERNEX_BIN = join(DIST, 'cli', 'kernex.js');
export const MOSQUITTO_BIN = ['/usr/sbin/mosquitto', '/usr/bin/mosquitto', '/usr/local/sbin/mosquitto'].find((p) => existsSync(p));

export interface Child {
  readonly name: string;
  readonly pid: number;
  readonly mqtt: BrokerTarget;
  sample(): ProcSample;
  output(): string;
  stop(): Promise<void>;
}

export interface KernexChild extends Child {
  readonly httpUrl: string;
  readonly dataDir: string;
  readonly adminToken: string;
  readonly enrollmentToken: string;
}

function track(name: string, child: ChildProcess) {
  let out = '';
  const keep = (d: Buffer) => {
    out += d.toString();
    if (out.length > 64_000) out = out.slice(-32_000);
  };
  child.stdout?.on('data', keep);
  child.stderr?.on('data', keep);
  const exited = new Promise<void>((r) => child.once('exit', () => r()));
  return {
    output: () => out,
    exited,
    async stop() {
      if (child.exitCode !== null || child.signalCode !== null) return;
      child.kill('SIGTERM');
      const killed = setTimeout(() => child.kill('SIGKILL'), 15_000);
      await exited;
      clearTimeout(killed);
    },
    failIfExited() {
      if (child.exitCode !== null || child.signalCode !== null) {
        throw new Error(`${name} exited (${child.exitCode ?? child.signalCode}):\n${out.slice(-4000)}`);
      }
    },
  };
}

export async function freePort(): Promise<number> {
  return new Promise((resolvePort, reject) => {
    const s = createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address() as { port: number };
      s.close(() => resolvePort(port));
    });
  });
}

/** `node dist/cli/kernex.js server` with a fresh data dir, both ports chosen by the OS. */
export async function startKernex(opts: { env?: Record<string, string>; logLevel?: string; nodeArgs?: string[] } = {}): Promise<KernexChild> {
  // e.g. KERNEX_BENCH_NODE_ARGS="--cpu-prof --cpu-prof-dir=/tmp/prof" to profile the controller under load.
  const nodeArgs = opts.nodeArgs ?? (process.env.KERNEX_BENCH_NODE_ARGS?.split(' ').filter(Boolean) ?? []);
  const dataDir = await mkdtemp(join(tmpdir(), 'kernex-bench-'));
  const child = spawn(process.execPath, [
    ...nodeArgs, KERNEX_BIN, 'server', '--data-dir', dataDir, '--http-port', '0', '--mqtt-port', '0', '--host', '127.0.0.1',
    '--log-level', opts.logLevel ?? 'warn',
  ], {
    stdio: ['ignore', 'pipe', 'pipe'],
    // The broker's protective limits are far above what is measured here, so
    // that what is measured is the controller, not a limit.
    env: {
      ...process.env, KERNEX_LOG_JSON: '1', KERNEX_MQTT_MAX_CONNECTIONS: '1000000', KERNEX_MQTT_MAX_PENDING_CONNECTIONS: '1000000',
      ...opts.env,
    },
  });
  const t = track('kernex server', child);
  const credsFile = join(dataDir, 'credentials.json');
  const deadline = Date.now() + 30_000;
  let creds: { server: string; mqtt: string; token: string; enrollment_token: string } | undefined;
  while (!creds) {
    t.failIfExited();
    if (Date.now() > deadline) {
      await t.stop();
      throw new Error(`kernex server did not start within 30 s:\n${t.output()}`);
    }
    try {
      creds = JSON.parse(await readFile(credsFile, 'utf8'));
    } catch {
      await sleep(50);
    }
  }
  const mqtt = new URL(creds.mqtt);
  return {
    name: 'kernex', pid: child.pid!, httpUrl: creds.server, dataDir, adminToken: creds.token, enrollmentToken: creds.enrollment_token,
    mqtt: { host: mqtt.hostname, port: Number(mqtt.port) },
    sample: () => sampleProcess(child.pid!),
    output: t.output,
    async stop() {
      await t.stop();
      await rm(dataDir, { recursive: true, force: true });
    },
  };
}

/** A bare Aedes broker (no authentication, no hooks, no store): what Kernex adds its work to. */
export async function startBareAedes(): Promise<Child> {
  const child = spawn(process.execPath, [join(DIST, 'bench', 'bare-aedes.js')], { stdio: ['ignore', 'pipe', 'pipe'] });
  const t = track('bare aedes', child);
  const port = await new Promise<number>((resolvePort, reject) => {
    child.stdout!.once('data', (d: Buffer) => resolvePort(Number(JSON.parse(d.toString()).port)));
    child.once('exit', () => reject(new Error(`bare aedes exited:\n${t.output()}`)));
  });
  return { name: 'aedes', pid: child.pid!, mqtt: { host: '127.0.0.1', port }, sample: () => sampleProcess(child.pid!), output: t.output, stop: t.stop };
}

/** Mosquitto on a free port: anonymous, no persistence, no connection limit. */
export async function startMosquitto(): Promise<Child> {
  if (!MOSQUITTO_BIN) throw new Error('mosquitto is not installed (apt-get install mosquitto); it is the reference broker');
  const dir = await mkdtemp(join(tmpdir(), 'kernex-bench-mosquitto-'));
  const port = await freePort();
  const conf = join(dir, 'mosquitto.conf');
  await writeFile(conf, [
    `listener ${port} 127.0.0.1`, 'allow_anonymous true', 'persistence false', 'max_connections -1',
    'max_queued_messages 100000', 'log_dest stderr', 'log_type error', 'log_type warning',
  ].join('\n') + '\n');
  const child = spawn(MOSQUITTO_BIN, ['-c', conf], { stdio: ['ignore', 'pipe', 'pipe'] });
  const t = track('mosquitto', child);
  // Ready when the port accepts connections.
  const deadline = Date.now() + 10_000;
  while (!(await accepts(port))) {
    t.failIfExited();
    if (Date.now() > deadline) throw new Error(`mosquitto did not listen on ${port}:\n${t.output()}`);
    await sleep(50);
  }
  return {
    name: 'mosquitto', pid: child.pid!, mqtt: { host: '127.0.0.1', port }, sample: () => sampleProcess(child.pid!), output: t.output,
    async stop() {
      await t.stop();
      await rm(dir, { recursive: true, force: true });
    },
  };
}

function accepts(port: number): Promise<boolean> {
  return new Promise((r) => {
    const socket = createConnection({ host: '127.0.0.1', port });
    socket.once('connect', () => {
      socket.destroy();
      r(true);
    });
    socket.once('error', () => r(false));
  });
}
