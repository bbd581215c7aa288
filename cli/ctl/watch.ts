// kernexctl watch — the fleet as it happens: heartbeats, status changes,
// results, configuration pushed and applied, deployment events.
import type { CommandModule } from 'yargs';
import { deviceId, run, splitList } from './command.js';
import type { GlobalArgs } from './context.js';
import { usageError } from './errors.js';
import { EVENT_TOPICS, openEventStream, type LiveEvent } from './events.js';
import { onInterrupt } from './interrupt.js';
import { formatDuration, formatTime } from './output.js';

const KINDS = ['heartbeat', 'status', 'results', 'config', 'deployments'] as const;
type Kind = (typeof KINDS)[number];

/** One line of `watch --json` (NDJSON). Stable: fields are only ever added. */
export interface WatchRecord {
  received_at: string;
  type: string;
  device_id: string | null;
  deployment_id?: string;
  config_version?: number;
  retained?: boolean;
  data?: unknown;
}

interface WatchArgs extends GlobalArgs {
  device?: string[];
  only?: string[];
  retained: boolean;
}

export const watchCommand: CommandModule<GlobalArgs, WatchArgs> = {
  command: 'watch',
  describe: 'stream fleet events as they happen (Ctrl-C to stop)',
  builder: (y) => y
    .option('device', { alias: 'd', type: 'string', array: true, describe: 'only these devices (comma-separated or repeated)' })
    .option('only', {
      type: 'string', array: true,
      describe: `only these kinds: ${KINDS.join(', ')} (comma-separated)`,
    })
    .option('retained', { type: 'boolean', default: false, describe: 'first print the last known status and config of each device' })
    .example('$0 watch', 'everything, live')
    .example('$0 watch -d dev-1 --only config', "one device's configuration")
    .example('$0 watch --json --only results', 'results, one JSON per line'),
  handler: run(async (ctx, argv) => {
    const devices = splitList(argv.device).map(deviceId);
    const only = splitList(argv.only);
    for (const k of only) if (!(KINDS as readonly string[]).includes(k)) throw usageError(`--only: unknown kind '${k}'; kinds: ${KINDS.join(', ')}`);
    const kinds = new Set<Kind>((only.length ? only : KINDS) as Kind[]);
    const ids = devices.length ? devices : ['+'];
    const deviceFilters = (ch: 'status' | 'heartbeat' | 'results' | 'config') =>
      kinds.has(ch) ? ids.map((id) => EVENT_TOPICS.device(id, ch)) : [];
    const wanted = new Set(devices);
    const { out } = ctx;

    const stream = await openEventStream(ctx, {
      filters: [
        ...deviceFilters('status'), ...deviceFilters('heartbeat'), ...deviceFilters('results'),
        ...(kinds.has('deployments') ? [EVENT_TOPICS.deployments] : []),
      ],
      // Reading config topics needs an operator or admin token; a viewer still watches the rest.
      optional: deviceFilters('config'),
    });
    out.notice(`Watching ${devices.length ? devices.join(', ') : 'the fleet'} on ${stream.url} (Ctrl-C to stop)`);

    const lastConfig = new Map<string, number>();
    const pushed = new Map<string, number>();
    const ourDeployments = new Set<string>();
    let width = Math.max(12, ...devices.map((d) => d.length));

    const emit = (rec: WatchRecord, what: string, detail: string, style?: Parameters<typeof out.style>[1]) => {
      // Fixed key order, so lines read alike: type, device, time, then the rest.
      const { type, device_id, received_at, ...rest } = rec;
      out.jsonLine({ type, device_id, received_at, ...rest });
      const dev = rec.device_id ?? '-';
      width = Math.max(width, dev.length);
      out.line(`${formatTime(rec.received_at)}  ${dev.padEnd(width)}  ${out.style(what.padEnd(11), style)}  ${detail}`);
    };

    stream.onEvent((e: LiveEvent) => {
      if (e.retained && !argv.retained) {
        // Remember what is current without printing it.
        if (e.channel === 'config') pushed.set(e.device_id, e.data.config_version);
        return;
      }
      const base = { received_at: e.received_at, device_id: e.device_id, ...(e.retained ? { retained: true } : {}) };
      switch (e.channel) {
        case 'heartbeat': {
          const hb = e.data;
          const v = hb.config_version;
          const before = lastConfig.get(e.device_id);
          if (typeof v === 'number') {
            lastConfig.set(e.device_id, v);
            const newlyApplied = (before !== undefined && v > before) || (before === undefined && pushed.get(e.device_id) === v && v > 0);
            if (newlyApplied) {
              pushed.delete(e.device_id);
              if (kinds.has('config')) {
                emit({ ...base, type: 'config.applied', config_version: v }, 'config', `applied v${v}`, 'green');
              }
            }
          }
          if (!kinds.has('heartbeat')) return;
          emit({ ...base, type: 'heartbeat', data: hb }, 'heartbeat',
            `${hb.status ?? 'online'} bundle=${hb.bundle_version ?? '-'} config=${v ? `v${v}` : '-'}` +
              (hb.uptime !== undefined ? ` uptime=${formatDuration(hb.uptime)}` : ''), 'dim');
          return;
        }
        case 'status':
          emit({ ...base, type: 'status', data: e.data }, 'status',
            `${e.data.status} bundle=${e.data.bundle_version ?? '-'}`, out.statusStyle(e.data.status));
          return;
        case 'results': {
          const r = e.data;
          const detail = r.status === 'in_progress'
            ? `${r.deployment_id} in_progress${r.phase ? ` (${r.phase})` : ''}`
            : `${r.deployment_id} ${r.status}${r.exit_code != null ? ` exit=${r.exit_code}` : ''}` +
              `${r.duration_seconds !== undefined ? ` in ${formatDuration(r.duration_seconds)}` : ''}${r.error_message ? `: ${r.error_message}` : ''}`;
          emit({ ...base, type: 'result', deployment_id: r.deployment_id, data: r }, 'result', detail, out.statusStyle(r.status));
          return;
        }
        case 'config':
          pushed.set(e.device_id, e.data.config_version);
          emit({ ...base, type: 'config', config_version: e.data.config_version, data: e.data }, 'config',
            `pushed v${e.data.config_version} polling_interval=${e.data.polling_interval} log_level=${e.data.log_level}`, 'cyan');
          return;
        case 'deployment': {
          if (!kinds.has('deployments')) return;
          const ev = e.data;
          if (wanted.size) {
            const mine = (ev.device_id && wanted.has(ev.device_id)) || ev.target_device_ids?.some((d) => wanted.has(d)) ||
              (ev.type === 'deployment.finished' && ourDeployments.has(ev.deployment_id));
            if (!mine) return;
            if (ev.type === 'deployment.created') ourDeployments.add(ev.deployment_id);
          }
          const rec: WatchRecord = { ...base, type: ev.type, deployment_id: ev.deployment_id, data: ev };
          if (ev.type === 'deployment.created') {
            emit(rec, ev.kind ?? 'deploy', `${ev.deployment_id} created: ${ev.bundle_version} to ${ev.target_device_ids?.length ?? '?'} device(s)`, 'cyan');
          } else if (ev.type === 'deployment.progress') {
            // The device's own result lines say the same, with more detail.
            if (kinds.has('results') && out.human) return;
            emit(rec, ev.kind ?? 'deploy', `${ev.deployment_id} ${ev.device_status}${ev.error_message ? `: ${ev.error_message}` : ''}`,
              out.statusStyle(ev.device_status));
          } else {
            const c = ev.counts ?? {};
            emit(rec, ev.kind ?? 'deploy', `${ev.deployment_id} finished ${ev.status}: ${c.succeeded ?? '?'}/${c.total ?? '?'} succeeded`,
              out.statusStyle(ev.status));
          }
        }
      }
    });

    // Until Ctrl-C or SIGTERM: ending a watch that way is success.
    await new Promise<void>((resolve) => onInterrupt(() => resolve()));
  }),
};
