// (5) Reconnect storm: every device loses its connection at the same
// instant and comes back after 1 s (the agent's first backoff step); time
// until all are reconnected, resubscribed and shown online (the retained
// status topic and the REST API). Reference: the same clients and storm
// against Mosquitto (reconnect and resubscribe; it has no notion of online).
import { Latency, monotonicUs, type SimDevice } from '../../sim/index.js';
import { startMosquitto } from '../harness/children.js';
import { kernexWithFleet, until } from '../harness/fleet.js';
import { observe } from '../harness/observer.js';
import { ratio, type BenchContext, type Row, type ScenarioResult } from '../report.js';

interface Storm {
  devices: number;
  all_reconnected_ms: number;
  all_resubscribed_ms: number;
  all_online_status_ms?: number;
  api_all_online_ms?: number;
  reconnect: ReturnType<Latency['summary']>;
}

export async function storm(ctx: BenchContext): Promise<ScenarioResult> {
  const n = ctx.devices ?? (ctx.quick ? 500 : 10000);
  ctx.log(`storm: ${n} devices dropped at once`);
  let t0 = 0;
  let active = false;
  const reconnected = new Map<string, number>();
  const resubscribed = new Map<string, number>();
  const setup = await kernexWithFleet(ctx, n, {
    mode: 'record', reconnectMs: 1000,
    hooks: {
      connected: (d: SimDevice) => {
        if (active && !reconnected.has(d.id)) reconnected.set(d.id, monotonicUs() - t0);
      },
      subscribed: (d: SimDevice) => {
        if (active && !resubscribed.has(d.id)) resubscribed.set(d.id, monotonicUs() - t0);
      },
    },
  });
  const { ctl, api, fleet } = setup;

  const run = async (name: string, extra?: (timeoutMs: number) => Promise<Partial<Storm>>): Promise<Storm> => {
    reconnected.clear();
    resubscribed.clear();
    active = true;
    t0 = monotonicUs();
    fleet.dropAll();
    const ok = await until(() => resubscribed.size >= n, 180_000, 10);
    if (!ok) throw new Error(`${name}: only ${reconnected.size} reconnected and ${resubscribed.size} resubscribed within 180 s`);
    const more = extra ? await extra(180_000) : {};
    active = false;
    const reconnect = new Latency();
    for (const v of reconnected.values()) reconnect.record(v);
    const result: Storm = {
      devices: n, all_reconnected_ms: Math.round(Math.max(...reconnected.values()) / 1000),
      all_resubscribed_ms: Math.round(Math.max(...resubscribed.values()) / 1000), reconnect: reconnect.summary(), ...more,
    };
    ctx.log(`  ${name}: all reconnected ${result.all_reconnected_ms} ms, resubscribed ${result.all_resubscribed_ms} ms`
      + (result.all_online_status_ms !== undefined ? `, online (status topic) ${result.all_online_status_ms} ms, API ${result.api_all_online_ms} ms` : ''));
    return result;
  };

  let kernex: Storm;
  try {
    const report = await fleet.connect(ctl.mqtt);
    if (report.failed) throw new Error(`${report.failed} devices could not connect: ${report.firstError}`);
    // Presence as integrators see it: the retained status topic.
    const offline = new Set<string>();
    const online = new Map<string, number>();
    const monitor = await observe(ctl.mqtt, 'kernex/devices/+/status', ctl.adminToken, (_t, payload) => {
      if (!active) return;
      const s = JSON.parse(payload.toString()) as { device_id: string; status: string };
      if (s.status === 'offline') offline.add(s.device_id);
      else if (s.status === 'online' && offline.has(s.device_id) && !online.has(s.device_id)) online.set(s.device_id, monotonicUs() - t0);
    });
    if (!(await until(async () => (await api.onlineCount()) >= n, 60_000, 250))) throw new Error('the fleet never showed online before the storm');
    kernex = await run('kernex', async (timeout) => {
      const shown = await until(() => online.size >= n, timeout, 10);
      if (!shown) throw new Error(`kernex: only ${online.size}/${n} shown online again (status topic)`);
      const statusMs = Math.round(Math.max(...online.values()) / 1000);
      await until(async () => (await api.onlineCount()) >= n, timeout, 100);
      return { all_online_status_ms: statusMs, api_all_online_ms: Math.round((monotonicUs() - t0) / 1000) };
    });
    await monitor.endAsync();
    await fleet.end();
  } finally {
    await ctl.stop();
  }
  const broker = await startMosquitto();
  let mosq: Storm;
  try {
    const report = await fleet.connect(broker.mqtt);
    if (report.failed) throw new Error(`mosquitto: ${report.failed} devices could not connect: ${report.firstError}`);
    mosq = await run('mosquitto');
    await fleet.end();
  } finally {
    await broker.stop();
  }

  const scenario = `reconnect storm ${n}`;
  const rows: Row[] = [
    { scenario, metric: 'all reconnected (from the drop)', unit: 'ms', kernex: kernex.all_reconnected_ms, reference: { name: 'mosquitto', value: mosq.all_reconnected_ms }, ratio: ratio(kernex.all_reconnected_ms, mosq.all_reconnected_ms) },
    { scenario, metric: 'all resubscribed', unit: 'ms', kernex: kernex.all_resubscribed_ms, reference: { name: 'mosquitto', value: mosq.all_resubscribed_ms }, ratio: ratio(kernex.all_resubscribed_ms, mosq.all_resubscribed_ms) },
    { scenario, metric: 'all shown online (status topic)', unit: 'ms', kernex: kernex.all_online_status_ms ?? null },
    { scenario, metric: 'all shown online (REST API)', unit: 'ms', kernex: kernex.api_all_online_ms ?? null },
    { scenario, metric: 'p99 reconnect', unit: 'µs', kernex: kernex.reconnect.p99_us, reference: { name: 'mosquitto', value: mosq.reconnect.p99_us }, ratio: ratio(kernex.reconnect.p99_us, mosq.reconnect.p99_us) },
  ];
  return {
    name: 'storm', rows,
    notes: ['every device reconnects 1 s after the drop (the agent\'s first backoff step, no jitter): the whole fleet arrives at once. Times include that 1 s.'],
    details: { kernex, mosquitto: mosq },
  };
}
