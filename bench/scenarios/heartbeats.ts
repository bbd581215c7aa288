// (2) Heartbeat ingest: N devices heartbeat (QoS 0, as the agent does) at a
// fleet-wide rate a little above the target. For Kernex: how many are
// persisted (embedded store) and how long from publish until the store holds
// that heartbeat or a newer one of the same device (coalescing), watched in
// the datafile; zero loss means every heartbeat sent is covered. For Kernex
// and the references (a bare Aedes, Mosquitto) alike, under the same load: an
// integrator subscribed to every tenth device's heartbeat topic measures
// publish→delivered (one subscriber for all of them would measure that one
// connection), and the broker's CPU.
import { join } from 'node:path';
import { Latency, monotonicUs, type Fleet, type SimDevice } from '../../sim/index.js';
import { startBareAedes, startMosquitto, type Child } from '../harness/children.js';
import { kernexWithFleet, until } from '../harness/fleet.js';
import { observe } from '../harness/observer.js';
import { FileTail } from '../harness/tail.js';
import { cpuPercent, sleep } from '../harness/proc.js';
import { ratio, type BenchContext, type Row, type ScenarioResult } from '../report.js';

const RING = 64;
/** One device in SAMPLE has its heartbeats delivered to the observing subscriber. */
const SAMPLE = 10;

interface Run {
  system: string;
  devices: number;
  seconds: number;
  sent: number;
  offered_per_s: number;
  delivered: number;
  delivered_per_s: number;
  delivered_lost: number;
  delivered_latency: ReturnType<Latency['summary']>;
  broker_cpu_percent: number;
  stored?: {
    covered: number;
    persisted_per_s: number;
    lost: number;
    latency: ReturnType<Latency['summary']>;
    datafile_lines: number;
  };
}

export async function heartbeats(ctx: BenchContext): Promise<ScenarioResult> {
  const n = ctx.devices ?? (ctx.quick ? 500 : 10000);
  const seconds = ctx.quick || ctx.devices ? 5 : 20;
  // 5% above one per device per second, so that the generator's own jitter cannot keep the offer under N/s.
  const intervalMs = Math.round(1000 / 1.05);
  ctx.log(`heartbeats: ${n} devices, one heartbeat each per ${intervalMs} ms, for ${seconds} s`);
  const setup = await kernexWithFleet(ctx, n, { mode: 'record' });
  const index = new Map(setup.credentials.map((c, i) => [c.device_id, i]));
  const sentAt = new Float64Array(n * RING);
  let current: { sent: number; sampledSent: number; delivered: number; latency: Latency } | undefined;
  const sampled = (i: number) => i % SAMPLE === 0;
  const onSent = (d: SimDevice, seq: number) => {
    const i = index.get(d.id)!;
    sentAt[i * RING + (seq % RING)] = monotonicUs();
    if (!current) return;
    current.sent++;
    if (sampled(i)) current.sampledSent++;
  };
  const sampleFilters = setup.credentials.filter((_c, i) => sampled(i)).map((c) => `kernex/devices/${c.device_id}/heartbeat`);

  const measure = async (system: string, broker: Child, fleet: Fleet, token: string | undefined, datafile?: string): Promise<Run> => {
    const report = await fleet.connect(broker.mqtt);
    if (report.failed) throw new Error(`${system}: ${report.failed} devices could not connect: ${report.firstError}`);
    const run = { sent: 0, sampledSent: 0, delivered: 0, latency: new Latency() };
    const observer = await observe(broker.mqtt, sampleFilters, token, (topic, payload) => {
      const i = index.get(topic.split('/')[2]!);
      const seq = (JSON.parse(payload.toString()) as { metrics?: { sim_seq?: number } }).metrics?.sim_seq;
      if (i === undefined || !seq || !current) return;
      run.delivered++;
      run.latency.record(monotonicUs() - sentAt[i * RING + (seq % RING)]!);
    });
    // Store side: every device's newest persisted sequence number.
    const persisted = new Int32Array(n);
    const firstSeq = new Int32Array(n).fill(-1);
    const stored = new Latency();
    let covered = 0;
    let lines = 0;
    const tail = datafile ? new FileTail(datafile, (line) => {
      if (!line.includes('"sim_seq"')) return;
      lines++;
      const doc = JSON.parse(line) as { device_id: string; metrics?: { sim_seq?: number } };
      const i = index.get(doc.device_id);
      const seq = doc.metrics?.sim_seq;
      if (i === undefined || !seq || firstSeq[i]! < 0) return;
      const at = monotonicUs();
      for (let s = Math.max(persisted[i]!, firstSeq[i]! - 1) + 1; s <= seq; s++) {
        stored.record(at - sentAt[i * RING + (s % RING)]!);
        covered++;
      }
      if (seq > persisted[i]!) persisted[i] = seq;
    }) : undefined;
    await tail?.start();
    // Counting starts with each device's next heartbeat.
    fleet.devices.forEach((d, i) => (firstSeq[i] = d.heartbeatSeq + 1));
    current = run;
    const a = broker.sample();
    const t0 = performance.now();
    fleet.startHeartbeats(intervalMs, { withSeq: true, onSent });
    await sleep(seconds * 1000);
    fleet.stopHeartbeats();
    const elapsed = (performance.now() - t0) / 1000;
    const b = broker.sample();
    // Let deliveries and the last flush land.
    await until(() => run.delivered >= run.sampledSent && (!tail || covered >= run.sent), 15_000, 50);
    await tail?.read();
    current = undefined;
    await tail?.stop();
    await observer.endAsync();
    await fleet.end();
    const result: Run = {
      system, devices: n, seconds: Math.round(elapsed * 10) / 10, sent: run.sent, offered_per_s: Math.round(run.sent / elapsed),
      delivered: run.delivered, delivered_per_s: Math.round(run.delivered / elapsed), delivered_lost: run.sampledSent - run.delivered,
      delivered_latency: run.latency.summary(), broker_cpu_percent: Math.round(cpuPercent(a, b)),
      ...(tail ? { stored: { covered, persisted_per_s: Math.round(covered / elapsed), lost: run.sent - covered, latency: stored.summary(), datafile_lines: lines } } : {}),
    };
    ctx.log(`  ${system}: sent ${run.sent} (${result.offered_per_s}/s), delivered ${run.delivered}/${run.sampledSent} sampled, p99 delivered ${result.delivered_latency.p99_us} µs, CPU ${result.broker_cpu_percent}%`
      + (result.stored ? `, persisted ${covered} (${result.stored.persisted_per_s}/s, lost ${result.stored.lost}), p99 stored ${result.stored.latency.p99_us} µs` : ''));
    return result;
  };

  let kernex: Run;
  try {
    kernex = await measure('kernex', setup.ctl, setup.fleet, setup.ctl.adminToken, join(setup.ctl.dataDir, 'db', 'devices.db'));
  } finally {
    await setup.ctl.stop();
  }
  const refs: Run[] = [];
  for (const start of [startBareAedes, startMosquitto]) {
    const broker = await start();
    try {
      refs.push(await measure(broker.name, broker, setup.fleet, undefined));
    } finally {
      await broker.stop();
    }
  }

  const scenario = `heartbeats ${n} devices`;
  const rows: Row[] = [];
  const s = kernex.stored!;
  rows.push({
    scenario, metric: 'persisted, zero loss', unit: '/s', kernex: s.lost === 0 ? s.persisted_per_s : 0,
    ...(n >= 10000 ? { target: '≥ 10,000/s, 0 lost', met: s.lost === 0 && s.persisted_per_s >= 10000 } : {}),
  });
  rows.push({ scenario, metric: 'lost (not persisted)', unit: '', kernex: s.lost });
  rows.push({ scenario, metric: 'p50 publish → stored', unit: 'µs', kernex: s.latency.p50_us });
  rows.push({ scenario, metric: 'p99 publish → stored', unit: 'µs', kernex: s.latency.p99_us });
  rows.push({ scenario, metric: 'offered by the simulator', unit: '/s', kernex: kernex.offered_per_s,
    reference: { name: refs.map((r) => r.system).join('/'), value: Math.min(...refs.map((r) => r.offered_per_s)) } });
  for (const ref of refs) {
    rows.push({ scenario, metric: 'not delivered (1/10 sampled)', unit: '', kernex: kernex.delivered_lost, reference: { name: ref.system, value: ref.delivered_lost } });
  }
  for (const ref of refs) {
    rows.push({ scenario, metric: 'p50 publish → subscriber', unit: 'µs', kernex: kernex.delivered_latency.p50_us, reference: { name: ref.system, value: ref.delivered_latency.p50_us }, ratio: ratio(kernex.delivered_latency.p50_us, ref.delivered_latency.p50_us) });
  }
  for (const ref of refs) {
    rows.push({ scenario, metric: 'p99 publish → subscriber', unit: 'µs', kernex: kernex.delivered_latency.p99_us, reference: { name: ref.system, value: ref.delivered_latency.p99_us }, ratio: ratio(kernex.delivered_latency.p99_us, ref.delivered_latency.p99_us) });
  }
  for (const ref of refs) {
    rows.push({ scenario, metric: 'broker CPU', unit: '%', kernex: kernex.broker_cpu_percent, reference: { name: ref.system, value: ref.broker_cpu_percent }, ratio: ratio(kernex.broker_cpu_percent, ref.broker_cpu_percent) });
  }
  const notes = [
    'publish → stored: until the datafile holds that heartbeat or a newer one of the same device (heartbeats are coalesced in memory and written in batches every KERNEX_HEARTBEAT_FLUSH_MS = 1000 ms, so ~0.5 s median is by design).',
    'broker CPU is percent of one core; Kernex authenticates the topic, validates, records and persists every heartbeat and delivers the sampled tenth; the references only deliver that tenth.',
  ];
  return { name: 'heartbeats', rows, notes, details: { kernex, references: refs } };
}
