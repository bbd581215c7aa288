// (3) Command fan-out: from the API call to each device receiving its
// command, for 100 / 1k / 10k connected devices; the same clients then
// receive the same command through Mosquitto from one publishing client.
import { randomUUID } from 'node:crypto';
import mqtt from 'mqtt';
import { Latency, monotonicUs, type SimDevice } from '../../sim/index.js';
import { startMosquitto } from '../harness/children.js';
import { kernexWithFleet, until } from '../harness/fleet.js';
import { noopBundle } from '../harness/api.js';
import { ratio, type BenchContext, type Row, type ScenarioResult } from '../report.js';

interface Round {
  t0: number;
  got: number;
  seen: Set<string>;
  latency: Latency;
  /** '*' while the deployment id is not known yet (only one deployment is in flight). */
  commandId: string;
}

const TARGETS: Record<number, number> = { 1000: 100_000, 10000: 1_000_000 };

export async function fanout(ctx: BenchContext): Promise<ScenarioResult> {
  const sizes = ctx.devices ? [ctx.devices] : ctx.quick ? [100, 500] : [100, 1000, 10000];
  const rounds = ctx.quick || ctx.devices ? 2 : 3;
  const n = Math.max(...sizes);
  let round: Round | undefined;
  const onCommand = (d: SimDevice, c: { command_id: string }, at: number) => {
    if (!round || (round.commandId !== '*' && c.command_id !== round.commandId) || round.seen.has(d.id)) return;
    round.seen.add(d.id);
    round.latency.record(at - round.t0);
    round.got++;
  };
  const kernex = new Map<number, Latency>();
  const apiTimes = new Map<number, Latency>();
  const mosq = new Map<number, Latency>();
  const notes: string[] = [];

  ctx.log(`fan-out: ${n} devices, sizes ${sizes.join('/')}, ${rounds} rounds each`);
  const setup = await kernexWithFleet(ctx, n, { mode: 'record', hooks: { command: onCommand } });
  const { ctl, api, fleet, credentials } = setup;
  try {
    const bundle = await api.upload(await noopBundle('1.0.0'));
    const report = await fleet.connect(ctl.mqtt);
    if (report.failed) throw new Error(`${report.failed} devices could not connect: ${report.firstError}`);
    for (const size of sizes) {
      const ids = credentials.slice(0, size).map((c) => c.device_id);
      const all = new Latency();
      const apiLatency = new Latency();
      for (let r = 0; r < rounds; r++) {
        // Commands arrive before the API answers with the deployment id, so
        // any command counts (one deployment at a time; each device once).
        const t0 = monotonicUs();
        round = { t0, got: 0, seen: new Set(), latency: new Latency(), commandId: '*' };
        const created = await api.post<{ deployment_id: string }>('/deployments', { bundle_version: bundle.version, target_device_ids: ids });
        apiLatency.record(monotonicUs() - t0);
        const ok = await until(() => round!.got >= size, 120_000);
        if (!ok) throw new Error(`fan-out to ${size}: only ${round.got} devices received the command within 120 s`);
        all.add(round.latency);
        round = undefined;
        // Clear the deployment (every device reports success) before the next round.
        await fleet.settle();
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
    await fleet.end();
  } finally {
    await ctl.stop();
  }

  const broker = await startMosquitto();
  try {
    const report = await fleet.connect(broker.mqtt);
    if (report.failed) throw new Error(`${report.failed} devices could not connect to mosquitto: ${report.firstError}`);
    const publisher = await mqtt.connectAsync({ host: broker.mqtt.host, port: broker.mqtt.port, clientId: `bench-pub-${randomUUID()}` });
    for (const size of sizes) {
      const all = new Latency();
      for (let r = 0; r < rounds; r++) {
        const id = randomUUID();
        const command = JSON.stringify({
          type: 'deploy', command_id: id, deployment_id: id, bundle_id: randomUUID(), bundle_version: '1.0.0',
          sha256: '0'.repeat(64), size: 100, url: `/api/v1/bundles/${id}`, issued_at: new Date().toISOString(),
        });
        round = { t0: monotonicUs(), got: 0, seen: new Set(), latency: new Latency(), commandId: id };
        for (let i = 0; i < size; i++) publisher.publish(`kernex/devices/${credentials[i]!.device_id}/commands`, command, { qos: 1 });
        const ok = await until(() => round!.got >= size, 120_000);
        if (!ok) throw new Error(`mosquitto fan-out to ${size}: only ${round.got} received within 120 s`);
        all.add(round.latency);
        round = undefined;
      }
      mosq.set(size, all);
      const s = all.summary();
      ctx.log(`  mosquitto ${size}: p50 ${s.p50_us} µs, p99 ${s.p99_us} µs, max ${s.max_us} µs`);
    }
    await publisher.endAsync();
    await fleet.end();
  } finally {
    await broker.stop();
  }

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
    + 'mosquitto: one client publishes the same command (QoS 1) to each device topic. Same simulated clients, same process, same clock.');
  return {
    name: 'fanout', rows, notes,
    details: Object.fromEntries(sizes.map((s) => [s, {
      kernex: kernex.get(s)!.summary(), kernex_api_answer: apiTimes.get(s)!.summary(), mosquitto: mosq.get(s)!.summary(), rounds,
    }])),
  };
}
