// (3) Command fan-out: from the API call to each device receiving its
// command, for 100 / 1k / 10k connected devices; the same clients then
// receive the same command through Mosquitto from one publishing client.
// The devices live in receiving processes of their own (harness/receivers.ts),
// so this process only makes the API call (or, for Mosquitto, publishes), as
// an operator's tool would.
import { randomUUID } from 'node:crypto';
import { loadavg } from 'node:os';
import mqtt from 'mqtt';
import { Latency, wallUs } from '../../sim/index.js';
import { startMosquitto } from '../harness/children.js';
import { kernexWithFleet, until } from '../harness/fleet.js';
import { noopBundle } from '../harness/api.js';
import { ReceiverPool } from '../harness/receivers.js';
import { ratio, type BenchContext, type Row, type ScenarioResult } from '../report.js';

const TARGETS: Record<number, number> = { 1000: 100_000, 10000: 1_000_000 };
const ROUND_TIMEOUT_MS = 120_000;

function logRound(ctx: BenchContext, broker: string, size: number, round: number, latency: Latency): void {
  const s = latency.summary();
  const ms = (us: number) => (us / 1000).toFixed(1);
  ctx.log(`    ${broker} ${size} ${round < 0 ? 'warm-up' : `round ${round + 1}`}: p50 ${ms(s.p50_us)} ms, p99 ${ms(s.p99_us)} ms, max ${ms(s.max_us)} ms`
    + ` (load average ${loadavg()[0]!.toFixed(2)})`);
}

export async function fanout(ctx: BenchContext): Promise<ScenarioResult> {
  const sizes = ctx.devices ? [ctx.devices] : ctx.quick ? [100, 500] : [100, 1000, 10000];
  const rounds = ctx.quick || ctx.devices ? 2 : 3;
  const n = Math.max(...sizes);
  const kernex = new Map<number, Latency>();
  const apiTimes = new Map<number, Latency>();
  const mosq = new Map<number, Latency>();
  const notes: string[] = [];

  // Registration only: the devices connect from the receiving processes.
  const { ctl, api, credentials } = await kernexWithFleet(ctx, n, { mode: 'record' });
  let receivers: ReceiverPool;
  try {
    receivers = await ReceiverPool.start(credentials, { server: ctl.httpUrl, processes: ctx.receivers });
  } catch (err) {
    await ctl.stop();
    throw err;
  }
  try {
    ctx.log(`fan-out: ${n} devices in ${receivers.processes} receiving process(es), sizes ${sizes.join('/')}, ${rounds} rounds each`);
    const bundle = await api.upload(await noopBundle('1.0.0'));
    const report = await receivers.connect(ctl.mqtt);
    if (report.failed) throw new Error(`${report.failed} devices could not connect: ${report.firstError}`);
    for (const size of sizes) {
      const ids = credentials.slice(0, size).map((c) => c.device_id);
      const all = new Latency();
      const apiLatency = new Latency();
      // The first size starts with a round that is not counted (both brokers):
      // the receiving processes' code is compiled by then, as the controller's is.
      for (let r = size === sizes[0] ? -1 : 0; r < rounds; r++) {
        // Commands arrive before the API answers with the deployment id, so
        // any command counts (one deployment at a time; each device once).
        await receivers.arm(size);
        const t0 = wallUs();
        const collected = receivers.collect(t0, ROUND_TIMEOUT_MS);
        const created = await api.post<{ deployment_id: string }>('/deployments', { bundle_version: bundle.version, target_device_ids: ids });
        apiLatency.record(wallUs() - t0);
        const { got, latency } = await collected;
        if (got < size) throw new Error(`fan-out to ${size}: only ${got} devices received the command within ${ROUND_TIMEOUT_MS / 1000} s`);
        logRound(ctx, 'kernex', size, r, latency);
        if (r >= 0) all.add(latency);
        // Clear the deployment (every device reports success) before the next round.
        await receivers.settle();
        const finished = await until(async () => {
          const [latest] = await api.get<Array<{ deployment_id: string; finished_at: string | null }>>('/deployments?limit=1');
          return latest?.deployment_id === created.deployment_id && Boolean(latest.finished_at);
        }, 120_000, 250);
        if (!finished) throw new Error(`deployment ${created.deployment_id} did not finish after every device reported`);
      }
      kernex.set(size, all);
      apiTimes.set(size, apiLatency);
      const s = all.summary();
      ctx.log(`  kernex ${size}: p50 ${s.p50_us} µs, p99 ${s.p99_us} µs, max ${s.max_us} µs (API answered in ${apiLatency.summary().p50_us} µs)`);
    }
    await receivers.end();
  } catch (err) {
    await receivers.stop();
    throw err;
  } finally {
    await ctl.stop();
  }

  const broker = await startMosquitto();
  try {
    const report = await receivers.connect(broker.mqtt);
    if (report.failed) throw new Error(`${report.failed} devices could not connect to mosquitto: ${report.firstError}`);
    const publisher = await mqtt.connectAsync({ host: broker.mqtt.host, port: broker.mqtt.port, clientId: `bench-pub-${randomUUID()}` });
    for (const size of sizes) {
      const all = new Latency();
      for (let r = size === sizes[0] ? -1 : 0; r < rounds; r++) {
        const id = randomUUID();
        const command = JSON.stringify({
          type: 'deploy', command_id: id, deployment_id: id, bundle_id: randomUUID(), bundle_version: '1.0.0',
          sha256: '0'.repeat(64), size: 100, url: `/api/v1/bundles/${id}`, issued_at: new Date().toISOString(),
        });
        await receivers.arm(size, id);
        const t0 = wallUs();
        const collected = receivers.collect(t0, ROUND_TIMEOUT_MS);
        for (let i = 0; i < size; i++) publisher.publish(`kernex/devices/${credentials[i]!.device_id}/commands`, command, { qos: 1 });
        const { got, latency } = await collected;
        if (got < size) throw new Error(`mosquitto fan-out to ${size}: only ${got} received within ${ROUND_TIMEOUT_MS / 1000} s`);
        logRound(ctx, 'mosquitto', size, r, latency);
        if (r >= 0) all.add(latency);
      }
      mosq.set(size, all);
      const s = all.summary();
      ctx.log(`  mosquitto ${size}: p50 ${s.p50_us} µs, p99 ${s.p99_us} µs, max ${s.max_us} µs`);
    }
    await publisher.endAsync();
    await receivers.end();
  } finally {
    await receivers.stop();
    await broker.stop();
  }
  const receiverCount = receivers.processes;
  const clockUs = receivers.clockUncertaintyUs;

  const rows: Row[] = [];
  for (const size of sizes) {
    const k = kernex.get(size)!.summary();
    const m = mosq.get(size)!.summary();
    const target = TARGETS[size];
    rows.push(
      { scenario: `fan-out ${size}`, metric: 'p50 API call → device', unit: 'µs', kernex: k.p50_us, reference: { name: 'mosquitto', value: m.p50_us }, ratio: ratio(k.p50_us, m.p50_us) },
      {
        scenario: `fan-out ${size}`, metric: 'p99 API call → device', unit: 'µs', kernex: k.p99_us, reference: { name: 'mosquitto', value: m.p99_us },
        ratio: ratio(k.p99_us, m.p99_us),
        ...(target ? { target: `≤ ${target / 1000} ms, ≤ 3x`, met: k.p99_us <= target && (ratio(k.p99_us, m.p99_us) ?? 0) <= 3 } : {}),
      },
      { scenario: `fan-out ${size}`, metric: 'max API call → device', unit: 'µs', kernex: k.max_us, reference: { name: 'mosquitto', value: m.max_us }, ratio: ratio(k.max_us, m.max_us) },
    );
  }
  notes.push('Kernex: POST /deployments (validation, per-device state documents, then one QoS 1 publish per device) until each simulated device has the command; '
    + 'mosquitto: one client in the bench process publishes the same command (QoS 1) to each device topic. '
    + `Same simulated clients for both, in ${receiverCount} receiving process(es) apart from the bench process; receipt on the wall clock `
    + `(clocks agree within ${clockUs} µs). One uncounted warm-up round per broker before the first size.`);
  return {
    name: 'fanout', rows, notes,
    details: Object.fromEntries(sizes.map((s) => [s, {
      kernex: kernex.get(s)!.summary(), kernex_api_answer: apiTimes.get(s)!.summary(), mosquitto: mosq.get(s)!.summary(), rounds,
      receiving_processes: receiverCount, clock_uncertainty_us: clockUs,
    }])),
  };
}
