// (1) Connections: ramp the fleet up in steps (1k, 5k, 10k, 20k); connect
// rate, p50/p99 CONNECT→CONNACK, controller RSS per connected device and its
// CPU while the fleet idles (heartbeats every 60 s, the agent's default);
// the same ramp against Mosquitto with the same clients.
import { Fleet, type ConnectReport } from '../../sim/index.js';
import { startMosquitto, type Child } from '../harness/children.js';
import { kernexWithFleet } from '../harness/fleet.js';
import { cpuPercent, sleep } from '../harness/proc.js';
import { ratio, type BenchContext, type Row, type ScenarioResult } from '../report.js';

interface Step {
  devices: number;
  connected: number;
  failed: number;
  connect_rate_per_s: number;
  connect_p50_us: number;
  connect_p99_us: number;
  rss_bytes: number;
  rss_per_device_bytes: number;
  rss_added_per_device_bytes: number;
  idle_cpu_percent: number;
  first_error?: string;
}

const IDLE_WINDOW_MS = 5_000;

export async function connections(ctx: BenchContext): Promise<ScenarioResult> {
  const wanted = ctx.devices ? [ctx.devices] : ctx.quick ? [200, 500] : [1000, 5000, 10000, 20000];
  // Both this process and the broker hold one descriptor per device.
  const cap = ctx.fdLimit - 300;
  const steps = [...new Set(wanted.map((s) => Math.min(s, cap)))];
  const notes: string[] = [];
  if (steps.at(-1)! < wanted.at(-1)!) {
    notes.push(`largest step capped at ${steps.at(-1)} devices: the open-file limit here is ${ctx.fdLimit} (ulimit -n) and cannot be raised without CAP_SYS_RESOURCE`);
  }
  const n = steps.at(-1)!;
  ctx.log(`connections: ramp ${steps.join(' → ')}`);

  const setup = await kernexWithFleet(ctx, n, { mode: 'record', keepaliveSeconds: 60 });
  let kernex: Step[];
  try {
    kernex = await ramp(ctx, 'kernex', setup.ctl, setup.fleet, steps);
    await setup.fleet.end();
  } finally {
    await setup.ctl.stop();
  }
  const broker = await startMosquitto();
  let mosquitto: Step[];
  try {
    mosquitto = await ramp(ctx, 'mosquitto', broker, setup.fleet, steps);
    await setup.fleet.end();
  } finally {
    await broker.stop();
  }

  const rows: Row[] = [];
  steps.forEach((size, i) => {
    const k = kernex[i]!;
    const m = mosquitto[i]!;
    const scenario = `connections ${size}`;
    rows.push(
      { scenario, metric: 'connected', unit: '', kernex: k.connected, reference: { name: 'mosquitto', value: m.connected },
        ...(size >= 10000 ? { target: '10,000 on one controller', met: k.connected >= 10000 } : {}) },
      { scenario, metric: 'connect rate', unit: '/s', kernex: k.connect_rate_per_s, reference: { name: 'mosquitto', value: m.connect_rate_per_s }, ratio: ratio(k.connect_rate_per_s, m.connect_rate_per_s) },
      { scenario, metric: 'p50 connect', unit: 'µs', kernex: k.connect_p50_us, reference: { name: 'mosquitto', value: m.connect_p50_us }, ratio: ratio(k.connect_p50_us, m.connect_p50_us) },
      { scenario, metric: 'p99 connect', unit: 'µs', kernex: k.connect_p99_us, reference: { name: 'mosquitto', value: m.connect_p99_us }, ratio: ratio(k.connect_p99_us, m.connect_p99_us) },
      { scenario, metric: 'RSS added per connected device', unit: 'KB', kernex: k.rss_added_per_device_bytes / 1024,
        reference: { name: 'mosquitto', value: m.rss_added_per_device_bytes / 1024 }, ratio: ratio(k.rss_added_per_device_bytes, m.rss_added_per_device_bytes),
        ...(size >= 1000 ? { target: '≤ 30 KB', met: k.rss_added_per_device_bytes <= 30 * 1024 } : {}) },
      { scenario, metric: 'RSS total / devices', unit: 'KB', kernex: k.rss_per_device_bytes / 1024, reference: { name: 'mosquitto', value: m.rss_per_device_bytes / 1024 }, ratio: ratio(k.rss_per_device_bytes, m.rss_per_device_bytes) },
      { scenario, metric: 'idle CPU (60 s heartbeats)', unit: '%', kernex: k.idle_cpu_percent, reference: { name: 'mosquitto', value: m.idle_cpu_percent }, ratio: ratio(k.idle_cpu_percent, m.idle_cpu_percent) },
    );
  });
  notes.push('RSS added per device = (RSS with N connected − RSS before the first connection, devices already registered) / N; '
    + 'RSS total / devices includes the runtime, the store (every device document in memory) and the registration traffic.');
  notes.push(`idle CPU: percent of one core over ${IDLE_WINDOW_MS / 1000} s with every device connected and heartbeating once a minute.`);
  return { name: 'connections', rows, notes, details: { steps, kernex, mosquitto, register_seconds: setup.registerSeconds } };
}

async function ramp(ctx: BenchContext, name: string, broker: Child, fleet: Fleet, steps: number[]): Promise<Step[]> {
  await sleep(1000);
  const base = broker.sample();
  const out: Step[] = [];
  let from = 0;
  for (const to of steps) {
    const report: ConnectReport = await fleet.connect(broker.mqtt, { from, to, concurrency: 256 });
    const c = report.connect.summary();
    fleet.startHeartbeats(60_000);
    await sleep(2000);
    const a = broker.sample();
    await sleep(IDLE_WINDOW_MS);
    const b = broker.sample();
    fleet.stopHeartbeats();
    const connected = fleet.connectedCount();
    const step: Step = {
      devices: to, connected, failed: report.failed, connect_rate_per_s: Math.round((to - from) / (report.elapsedMs / 1000)),
      connect_p50_us: c.p50_us, connect_p99_us: c.p99_us, rss_bytes: b.rss,
      rss_per_device_bytes: Math.round(b.rss / Math.max(1, connected)),
      rss_added_per_device_bytes: Math.round((b.rss - base.rss) / Math.max(1, connected)),
      idle_cpu_percent: Math.round(cpuPercent(a, b) * 10) / 10, first_error: report.firstError,
    };
    out.push(step);
    ctx.log(`  ${name} ${to}: ${connected} connected (${report.failed} failed), ${step.connect_rate_per_s}/s, p50 ${c.p50_us} µs, p99 ${c.p99_us} µs, `
      + `RSS ${(b.rss / 1048576).toFixed(0)} MB (+${(step.rss_added_per_device_bytes / 1024).toFixed(1)} KB/device), idle CPU ${step.idle_cpu_percent}%`);
    from = to;
  }
  return out;
}
