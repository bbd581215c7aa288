// kernexctl devices list | get | history
import type { Argv, CommandModule } from 'yargs';
import { deviceId, deviceNotFound, run } from './command.js';
import type { GlobalArgs } from './context.js';
import { dash, formatAge, formatDuration, type Column, type Output } from './output.js';
import { DEVICE_STATUSES, type Device, type HistoryEntry } from './types.js';

const columns = (out: Output): Column<Device>[] => [
  { header: 'DEVICE', value: (d) => d.device_id },
  { header: 'STATUS', value: (d) => d.status, style: (d) => out.statusStyle(d.status) },
  { header: 'BUNDLE', value: (d) => dash(d.current_bundle_version) },
  { header: 'CONFIG', value: (d) => (d.config_version ? `v${d.config_version}` : '-') },
  { header: 'LAST HEARTBEAT', value: (d) => formatAge(d.last_heartbeat) },
  { header: 'VIA', value: (d) => dash(d.connection) },
];

const list: CommandModule<GlobalArgs, GlobalArgs & { status?: string }> = {
  command: ['list', 'ls'],
  describe: 'list devices, with status, bundle version and last heartbeat',
  builder: (y) => y
    .option('status', { type: 'string', choices: DEVICE_STATUSES, describe: 'only devices with this status' })
    .example('$0 devices list --status offline', 'devices not connected')
    .example('$0 devices list -q', 'ids only, for scripts'),
  handler: run(async (ctx, argv) => {
    const devices = await ctx.api.get<Device[]>('/devices', { query: { status: argv.status } });
    ctx.out.json(devices);
    for (const d of devices) ctx.out.id(d.device_id);
    if (!devices.length) {
      ctx.out.line(argv.status ? `No ${argv.status} devices.` : 'No devices registered yet: start an agent with an enrollment token.');
      return;
    }
    ctx.out.table(columns(ctx.out), devices);
  }),
};

const get: CommandModule<GlobalArgs, GlobalArgs & { device: string }> = {
  command: 'get <device>',
  describe: 'show one device',
  builder: (y) => y.positional('device', { type: 'string', demandOption: true, describe: 'device id' }),
  handler: run(async (ctx, argv) => {
    const id = deviceId(argv.device);
    const d = await ctx.api.get<Device>(`/devices/${encodeURIComponent(id)}`, { notFound: deviceNotFound(id) });
    ctx.out.json(d);
    ctx.out.id(d.device_id);
    ctx.out.fields([
      ['Device', d.device_id],
      ['Status', ctx.out.style(d.status, ctx.out.statusStyle(d.status))],
      ['Connection', dash(d.connection)],
      ['Bundle', dash(d.current_bundle_version)],
      ['Config version', dash(d.config_version)],
      ['Last heartbeat', d.last_heartbeat ? `${d.last_heartbeat} (${formatAge(d.last_heartbeat)})` : '-'],
      ['Uptime', formatDuration(d.uptime)],
      ['Hardware id', dash(d.hardware_id)],
      ['Registered', dash(d.created_at)],
    ]);
  }),
};

const history: CommandModule<GlobalArgs, GlobalArgs & { device: string; limit: number }> = {
  command: 'history <device>',
  describe: 'bundle versions deployed to a device, most recent first',
  builder: (y) => y
    .positional('device', { type: 'string', demandOption: true, describe: 'device id' })
    .option('limit', { type: 'number', default: 20, describe: 'how many entries (1-100)' })
    .example('$0 devices history dev-1 --limit 5', 'the last five deployments to dev-1'),
  handler: run(async (ctx, argv) => {
    const id = deviceId(argv.device);
    const entries = await ctx.api.get<HistoryEntry[]>(`/devices/${encodeURIComponent(id)}/bundle-history`, {
      query: { limit: argv.limit }, notFound: deviceNotFound(id),
    });
    ctx.out.json(entries);
    for (const e of entries) ctx.out.id(e.bundle_version);
    if (!entries.length) {
      ctx.out.line(`Nothing deployed to ${id} yet.`);
      return;
    }
    ctx.out.table<HistoryEntry>([
      { header: 'DEPLOYED', value: (e) => e.deployed_at },
      { header: 'VERSION', value: (e) => e.bundle_version },
      { header: 'KIND', value: (e) => dash(e.kind) },
      { header: 'STATUS', value: (e) => e.status, style: (e) => ctx.out.statusStyle(e.status) },
      { header: 'DURATION', value: (e) => formatDuration(e.duration_seconds) },
      { header: 'DEPLOYMENT', value: (e) => dash(e.deployment_id) },
      { header: 'ERROR', value: (e) => dash(e.error_message) },
    ], entries);
  }),
};

export const devicesCommand: CommandModule<GlobalArgs, GlobalArgs> = {
  command: ['devices', 'device'],
  describe: 'registered devices: list, inspect, bundle history',
  builder: (y: Argv<GlobalArgs>) => y
    .command(list)
    .command(get)
    .command(history)
    .demandCommand(1, 'name a devices command: list, get or history'),
  handler: () => {},
};
