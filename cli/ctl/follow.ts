// `--wait` for deployments and rollbacks: live per-device progress from the
// controller's MQTT event stream, a summary, and an exit code.
//
// Nothing is missed: the subscription to kernex/events/deployments/+ is in
// place before the deployment is created (events are buffered until its id is
// known), and the REST view is read once subscribed, after every reconnect,
// and when the events say it is done. Per-device states only move forward
// (pending → in_progress → final), so it does not matter in which order the
// REST view and the events arrive. Without MQTT, it polls the REST view.
import type { Context } from './context.js';
import { CtlError, EXIT } from './errors.js';
import { openEventStream, EVENT_TOPICS, type EventStream, type LiveEvent } from './events.js';
import { dash, formatDuration, formatTime, type Column } from './output.js';
import { onInterrupt } from './interrupt.js';
import { FINAL_STATUSES, type Deployment, type DeviceDeployment } from './types.js';

const POLL_MS = 1000;

export interface FollowOptions {
  wait: boolean;
  /** Seconds; 0 waits as long as it takes. */
  timeoutSeconds: number;
}

const rank = (status: string) => (FINAL_STATUSES.has(status) ? 2 : status === 'in_progress' ? 1 : 0);

/** Opens the event stream if it can; otherwise says why and returns null (the caller polls). */
async function eventsOrPolling(ctx: Context): Promise<EventStream | null> {
  try {
    return await openEventStream(ctx, { filters: [EVENT_TOPICS.deployments] });
  } catch (err) {
    if (!(err instanceof CtlError) || err.exitCode === EXIT.usage) throw err;
    ctx.out.notice(`live events unavailable (${err.message}); following by polling the REST API every ${POLL_MS / 1000} s`);
    return null;
  }
}

export async function startAndFollow(
  ctx: Context,
  create: () => Promise<Deployment>,
  opts: FollowOptions,
): Promise<number> {
  const { out } = ctx;
  const buffered: LiveEvent[] = [];
  let onEvent: ((e: LiveEvent) => void) | null = null;
  const events = opts.wait ? await eventsOrPolling(ctx) : null;
  events?.onEvent((e) => (onEvent ? onEvent(e) : buffered.push(e)));

  const created = await create();
  const id = created.deployment_id;
  const verb = created.kind === 'rollback' ? 'rolling back to' : 'deploying';
  const targets = created.target_device_ids ?? [];
  if (!opts.wait) {
    out.json(created);
    out.id(id);
    out.line(`Deployment ${id} created: ${verb} ${created.bundle_version} on ${targets.length} device(s).`);
    out.line(`Follow it with: kernexctl deployments wait ${id}`);
    return EXIT.ok;
  }

  out.line(`Deployment ${id}: ${verb} ${created.bundle_version} on ${targets.length} device(s)`);
  const states = new Map<string, DeviceDeployment>(targets.map((d) => [d, { device_id: d, status: 'pending' }]));
  const started = Date.now();
  const live = out.liveLine();
  const width = Math.max(0, ...targets.map((d) => d.length));

  const counts = () => {
    let done = 0, ok = 0, bad = 0, running = 0;
    for (const s of states.values()) {
      if (FINAL_STATUSES.has(s.status)) {
        done++;
        if (s.status === 'success') ok++;
        else bad++;
      } else if (s.status === 'in_progress') running++;
    }
    return { done, ok, bad, running, pending: states.size - done - running };
  };
  const showCounts = (force = false) => {
    if (!live) return;
    const c = counts();
    const secs = Math.round((Date.now() - started) / 1000);
    live.set(`${c.done}/${states.size} done · ${c.ok} succeeded · ${c.bad} failed · ${c.running} in progress · ` +
      `${c.pending} pending · ${secs}s`, force);
  };

  /** Moves a device forward; prints the change. */
  const advance = (next: DeviceDeployment, at?: string) => {
    const prev = states.get(next.device_id);
    if (prev && rank(next.status) <= rank(prev.status)) {
      // Both final: keep the first status, take the richer details (the REST view has exit codes).
      if (FINAL_STATUSES.has(next.status) && FINAL_STATUSES.has(prev.status)) {
        states.set(next.device_id, { ...prev, ...next, status: prev.status });
      }
      return;
    }
    states.set(next.device_id, { ...prev, ...next });
    const detail = next.status === 'success'
      ? next.duration_seconds != null ? ` in ${formatDuration(next.duration_seconds)}` : ''
      : FINAL_STATUSES.has(next.status) && next.error_message ? `: ${next.error_message}` : '';
    out.line(`${formatTime(at ?? new Date())}  ${next.device_id.padEnd(width)}  ${out.style(next.status, out.statusStyle(next.status))}${detail}`);
    showCounts(true);
  };

  let finalView: Deployment | null = null;
  let settle!: (view: Deployment) => void;
  let fail!: (err: Error) => void;
  const finished = new Promise<Deployment>((res, rej) => {
    settle = res;
    fail = rej;
  });

  // One REST read at a time; a request for another while one runs is merged.
  let reading: Promise<void> | null = null;
  let again = false;
  const reconcile = (): Promise<void> => {
    if (reading) {
      again = true;
      return reading;
    }
    reading = (async () => {
      do {
        again = false;
        const view = await ctx.api.get<Deployment>(`/deployments/${encodeURIComponent(id)}`);
        for (const d of view.devices ?? []) advance(d, d.finished_at ?? undefined);
        if (view.finished_at) {
          finalView = view;
          settle(view);
          return;
        }
      } while (again);
    })().finally(() => (reading = null));
    return reading.catch((err: Error) => fail(err));
  };

  let endCheck: NodeJS.Timeout | undefined;
  const handle = (e: LiveEvent) => {
    if (e.channel !== 'deployment' || e.data.deployment_id !== id || finalView) return;
    const ev = e.data;
    if (ev.type === 'deployment.progress' && ev.device_id && ev.device_status) {
      advance({ device_id: ev.device_id, status: ev.device_status as DeviceDeployment['status'], error_message: ev.error_message }, ev.at);
      // Every device final but no `finished` event yet: look, in case it was missed.
      if (counts().done === states.size) {
        clearTimeout(endCheck);
        endCheck = setTimeout(() => void reconcile(), 500);
      }
    } else if (ev.type === 'deployment.finished') {
      void reconcile();
    }
  };

  const timers: NodeJS.Timeout[] = [];
  const onSignal = () =>
    fail(new CtlError(`stopped waiting; deployment ${id} goes on. Follow it again with: kernexctl deployments wait ${id}`,
      EXIT.interrupted));
  const withdraw = onInterrupt(onSignal);
  if (opts.timeoutSeconds > 0) {
    timers.push(setTimeout(() => {
      const c = counts();
      fail(new CtlError(
        `deployment ${id} is still running after ${opts.timeoutSeconds} s (${c.done} of ${states.size} devices finished); ` +
          `follow it with: kernexctl deployments wait ${id}`, EXIT.timeout));
    }, opts.timeoutSeconds * 1000));
  }
  timers.push(setInterval(() => showCounts(), 1000));
  if (events) {
    onEvent = handle;
    for (const e of buffered.splice(0)) handle(e);
    events.onReconnect(() => void reconcile());
  } else {
    timers.push(setInterval(() => void reconcile(), POLL_MS));
  }
  showCounts(true);
  void reconcile();

  let view: Deployment;
  try {
    view = await finished;
  } finally {
    for (const t of timers) clearTimeout(t);
    clearTimeout(endCheck);
    withdraw();
    live?.clear();
    await events?.close();
  }
  return report(ctx, view, Date.now() - started);
}

/** The summary at the end of a --wait, and the exit code. */
export function report(ctx: Context, view: Deployment, elapsedMs?: number): number {
  const { out } = ctx;
  out.json(view);
  out.id(view.deployment_id);
  const devices = view.devices ?? [];
  printDeviceStates(ctx, devices);
  const failed = devices.filter((d) => d.status !== 'success');
  const took = elapsedMs !== undefined ? ` in ${formatDuration(elapsedMs / 1000)}` : '';
  const what = view.kind === 'rollback' ? `rollback to ${view.bundle_version}` : `deployment of ${view.bundle_version}`;
  if (view.status === 'success' && failed.length === 0) {
    out.line(out.style(`✔ ${what} succeeded on ${devices.length}/${devices.length} device(s)${took}`, 'green'));
    return EXIT.ok;
  }
  const timedOut = failed.filter((d) => d.status === 'timed_out').length;
  out.line(out.style(
    `✘ ${what} failed on ${failed.length} of ${devices.length} device(s)${timedOut ? ` (${timedOut} timed out)` : ''}${took}; ` +
      `details: kernexctl deployments get ${view.deployment_id}`, 'red'));
  return EXIT.failed;
}

export function printDeviceStates(ctx: Context, devices: DeviceDeployment[]): void {
  const { out } = ctx;
  const columns: Column<DeviceDeployment>[] = [
    { header: 'DEVICE', value: (d) => d.device_id },
    { header: 'STATUS', value: (d) => d.status + (d.phase ? ` (${d.phase})` : ''), style: (d) => out.statusStyle(d.status) },
    { header: 'EXIT', value: (d) => dash(d.exit_code) },
    { header: 'DURATION', value: (d) => formatDuration(d.duration_seconds) },
    { header: 'ERROR', value: (d) => dash(d.error_message) },
  ];
  out.line();
  out.table(columns, devices);
  out.line();
}
