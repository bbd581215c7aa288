// (4) End-to-end deploy: N devices receive the command, download the bundle
// with their own token, verify size and sha256 (with --run-scripts also
// extract it and run its no-op deploy script) and report; time from the API call until 50/99/100% are
// recorded. Reference: the earlier system, devices polling
// POST /devices/{id}/heartbeat every 60 s and reporting over REST.
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { BundleWork, Latency, PollingFleet, monotonicUs } from '../../sim/index.js';
import { kernexWithFleet, until } from '../harness/fleet.js';
import { noopBundle } from '../harness/api.js';
import { ratio, type BenchContext, type Row, type ScenarioResult } from '../report.js';

interface Outcome {
  devices: number;
  succeeded: number;
  failed: number;
  t50_ms: number;
  t99_ms: number;
  t100_ms: number;
  completion: ReturnType<Latency['summary']>;
}

const at = (sorted: number[], p: number) => sorted.length ? sorted[Math.min(sorted.length - 1, Math.ceil((p / 100) * sorted.length) - 1)]! : 0;

function outcome(devices: number, times: number[], failed: number): Outcome {
  const sorted = [...times].sort((a, b) => a - b);
  const completion = new Latency();
  for (const t of sorted) completion.record(t);
  return {
    devices, succeeded: sorted.length, failed,
    t50_ms: Math.round(at(sorted, 50) / 100) / 10, t99_ms: Math.round(at(sorted, 99) / 100) / 10, t100_ms: Math.round(at(sorted, 100) / 100) / 10,
    completion: completion.summary(),
  };
}

export async function deploy(ctx: BenchContext): Promise<ScenarioResult> {
  const n = ctx.devices ?? (ctx.quick ? 100 : 1000);
  const pollMs = ctx.quick || ctx.devices ? 6_000 : 60_000;
  const scale = 60_000 / pollMs;
  ctx.log(`deploy: ${n} devices over MQTT, then ${n} devices polling every ${pollMs / 1000} s`);

  let t0 = 0;
  const done: number[] = [];
  let failed = 0;
  const setup = await kernexWithFleet(ctx, n, {
    mode: 'execute', runScripts: ctx.runScripts,
    hooks: {
      result: (_d, r, when) => {
        if (r.status === 'success') done.push(when - t0);
        else failed++;
      },
    },
  }, { extraDevices: { prefix: 'poll', n } });
  const { ctl, api, fleet } = setup;
  let push: Outcome;
  let poll: Outcome;
  let pollScaled: Outcome | undefined;
  const notes: string[] = [];
  try {
    const bundle = await api.upload(await noopBundle('1.0.0'));
    const report = await fleet.connect(ctl.mqtt);
    if (report.failed) throw new Error(`${report.failed} devices could not connect: ${report.firstError}`);

    t0 = monotonicUs();
    const created = await api.post<{ deployment_id: string }>('/deployments', {
      bundle_version: bundle.version, target_device_ids: setup.credentials.map((c) => c.device_id),
    });
    if (!(await until(() => done.length + failed >= n, 300_000, 20))) throw new Error(`only ${done.length + failed}/${n} devices reported within 300 s`);
    push = outcome(n, done, failed);
    const dep = await api.get<{ status: string; succeeded: number }>(`/deployments/${created.deployment_id}`);
    notes.push(`push: the controller recorded the deployment as ${dep.status} with ${dep.succeeded}/${n} succeeded.`);
    ctx.log(`  push: 50% ${push.t50_ms} ms, 99% ${push.t99_ms} ms, 100% ${push.t100_ms} ms (${push.failed} failed)`);
    await fleet.end();

    // The earlier system: no connection, a poll per interval, results over REST.
    const pickup = new Map<string, number>();
    const finished: number[] = [];
    const scaled: number[] = [];
    let pollFailed = 0;
    const pollers = new PollingFleet(setup.extra, {
      server: ctl.httpUrl, intervalMs: pollMs,
      work: new BundleWork({
        server: ctl.httpUrl, sharedDownloads: false, runScripts: ctx.runScripts, workDir: join(tmpdir(), `kernex-bench-poll-${process.pid}`),
        downloadConcurrency: 128, deployTimeoutSeconds: 300,
      }),
      hooks: {
        command: (id, _c, when) => pickup.set(id, when - t0),
        result: (id, status, when) => {
          if (status !== 'success') {
            pollFailed++;
            return;
          }
          const total = when - t0;
          finished.push(total);
          const waited = pickup.get(id) ?? total;
          scaled.push(waited * scale + (total - waited));
        },
      },
    });
    pollers.start();
    // Every device has polled once before the deployment: a fleet in its steady state.
    await new Promise((r) => setTimeout(r, pollMs + 500));
    t0 = monotonicUs();
    await api.post('/deployments', { bundle_version: bundle.version, target_device_ids: setup.extra.map((c) => c.device_id) });
    const ok = await until(() => finished.length + pollFailed >= n, pollMs * 2 + 120_000, 50);
    pollers.stop();
    if (!ok) throw new Error(`polling: only ${finished.length + pollFailed}/${n} devices reported`);
    poll = outcome(n, finished, pollFailed);
    if (scale !== 1) {
      pollScaled = outcome(n, scaled, pollFailed);
      notes.push(`polling ran with a ${pollMs / 1000} s interval (quick run); "HTTP polling 60 s" figures are scaled: each device's wait for its poll × ${scale} + its measured download/verify/run/report time.`);
    } else {
      notes.push('polling ran in real time with a 60 s interval, as the earlier system did.');
    }
    ctx.log(`  polling ${pollMs / 1000} s: 50% ${poll.t50_ms} ms, 99% ${poll.t99_ms} ms, 100% ${poll.t100_ms} ms`);
  } finally {
    await ctl.stop();
  }

  const ref = pollScaled ?? poll;
  const scenario = `deploy ${n}`;
  const name = 'HTTP polling 60 s';
  const rows: Row[] = [
    { scenario, metric: 'succeeded', unit: '', kernex: push.succeeded, reference: { name, value: ref.succeeded } },
    { scenario, metric: 'time to 50% done', unit: 'ms', kernex: push.t50_ms, reference: { name, value: ref.t50_ms }, ratio: ratio(push.t50_ms, ref.t50_ms) },
    { scenario, metric: 'time to 99% done', unit: 'ms', kernex: push.t99_ms, reference: { name, value: ref.t99_ms }, ratio: ratio(push.t99_ms, ref.t99_ms) },
    {
      scenario, metric: 'time to 100% done', unit: 'ms', kernex: push.t100_ms, reference: { name, value: ref.t100_ms }, ratio: ratio(push.t100_ms, ref.t100_ms),
      ...(n >= 1000 ? { target: '≤ 15 s', met: push.t100_ms <= 15_000 && push.failed === 0 } : {}),
    },
  ];
  notes.push(ctx.runScripts
    ? 'each device: command → in_progress reports → download with its token → size+sha256 check → safe extract → run deploy.sh (exit 0) → final result acknowledged once recorded (QoS 1).'
    : 'each device: command → in_progress reports → download with its own token → size+sha256 check → final result acknowledged once recorded (QoS 1). '
      + 'The no-op script is not spawned (--run-scripts does: a thousand processes on the load generator\'s two cores then dominate).');
  return { name: 'deploy', rows, notes, details: { push, polling: poll, polling_scaled_to_60s: pollScaled ?? null, poll_interval_ms: pollMs } };
}
