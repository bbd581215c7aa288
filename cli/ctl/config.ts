// kernexctl config get | set — a device's configuration (not kernexctl's own).
import type { Argv, CommandModule } from 'yargs';
import { deviceId, deviceNotFound, positiveInt, run } from './command.js';
import type { Context, GlobalArgs } from './context.js';
import { CtlError, EXIT, usageError } from './errors.js';
import { EVENT_TOPICS, openEventStream } from './events.js';
import { dash } from './output.js';
import type { Device, DeviceConfig } from './types.js';

export const CONFIG_KEYS = ['polling_interval', 'heartbeat_timeout', 'deploy_timeout', 'log_level', 'metadata_json'] as const;

/** `key=value` pairs → the PUT body, checked against the config-update schema before anything is sent. */
export async function parseSettings(pairs: string[]): Promise<Record<string, unknown>> {
  const { validate, SchemaError } = await import('../../schemas/index.js');
  const body: Record<string, unknown> = {};
  for (const pair of pairs) {
    const eq = pair.indexOf('=');
    if (eq <= 0) throw usageError(`'${pair}' is not key=value (keys: ${CONFIG_KEYS.join(', ')})`);
    const key = pair.slice(0, eq).trim().replace(/-/g, '_');
    const raw = pair.slice(eq + 1).trim();
    if (!(CONFIG_KEYS as readonly string[]).includes(key)) {
      throw usageError(`unknown setting '${key}'; settable: ${CONFIG_KEYS.join(', ')}`);
    }
    if (key === 'metadata_json') {
      try {
        body[key] = raw === '' || raw === 'null' ? null : JSON.parse(raw);
      } catch {
        throw usageError(`metadata_json must be a JSON object, e.g. metadata_json='{"site":"lab"}'`);
      }
    } else if (key === 'log_level') {
      body[key] = raw.toUpperCase() === 'WARN' ? 'WARNING' : raw.toUpperCase();
    } else {
      body[key] = raw;
    }
  }
  try {
    // Coerces "120" to 120, as the controller does.
    return validate.configUpdate.parse(body) as Record<string, unknown>;
  } catch (err) {
    if (err instanceof SchemaError) {
      throw usageError(`invalid settings: ${err.details.map((d) => d.replace(/^\//, '')).join('; ')}`);
    }
    throw err;
  }
}

function printConfig(ctx: Context, id: string, c: DeviceConfig, applied?: number | null): void {
  const appliedText = applied === undefined ? undefined
    : applied === c.version ? ctx.out.style('yes', 'green')
      : `no (device runs v${dash(applied)})`;
  ctx.out.fields([
    ['Device', id],
    ['Version', `v${c.version}`],
    ...(appliedText ? [['Applied', appliedText] as [string, string]] : []),
    ['polling_interval', `${c.polling_interval} s`],
    ['heartbeat_timeout', `${c.heartbeat_timeout} s`],
    ['deploy_timeout', `${c.deploy_timeout} s`],
    ['log_level', c.log_level],
    ['metadata_json', c.metadata_json ? JSON.stringify(c.metadata_json) : '-'],
    ['Updated', dash(c.updated_at)],
  ]);
}

const get: CommandModule<GlobalArgs, GlobalArgs & { device: string }> = {
  command: 'get <device>',
  describe: "show a device's configuration and whether the device has applied it",
  builder: (y) => y.positional('device', { type: 'string', demandOption: true, describe: 'device id' }),
  handler: run(async (ctx, argv) => {
    const id = deviceId(argv.device);
    const path = `/devices/${encodeURIComponent(id)}`;
    const [config, device] = await Promise.all([
      ctx.api.get<DeviceConfig>(`${path}/config`, { notFound: deviceNotFound(id) }),
      ctx.api.get<Device>(path, { notFound: deviceNotFound(id) }),
    ]);
    ctx.out.json(config);
    ctx.out.id(String(config.version));
    printConfig(ctx, id, config, device.config_version ?? null);
  }),
};

const set: CommandModule<GlobalArgs, GlobalArgs & { device: string; settings: string[]; wait: boolean; timeout: number }> = {
  command: 'set <device> <settings..>',
  describe: 'change settings (key=value); the device gets them at once over MQTT',
  builder: (y) => y
    .positional('device', { type: 'string', demandOption: true, describe: 'device id' })
    .positional('settings', {
      type: 'string', array: true, demandOption: true,
      describe: `key=value pairs; keys: ${CONFIG_KEYS.join(', ')}`,
    })
    .option('wait', { alias: 'w', type: 'boolean', default: false, describe: 'wait until the device reports it applied the new version' })
    .option('timeout', { type: 'number', default: 120, describe: 'with --wait: seconds to wait (exit 5 after); 0 = no limit' })
    .example('$0 config set dev-1 log_level=DEBUG', 'more logs')
    .example('$0 config set dev-1 polling_interval=30 -w', 'and wait until applied')
    .example(`$0 config set dev-1 metadata_json='{"a":1}'`, 'free-form metadata'),
  handler: run(async (ctx, argv) => {
    const id = deviceId(argv.device);
    const body = await parseSettings(argv.settings);
    const timeout = positiveInt(argv.timeout, '--timeout');
    // Subscribed before the change, so the heartbeat that confirms it cannot slip by.
    const events = argv.wait
      ? await openEventStream(ctx, { filters: [EVENT_TOPICS.device(id, 'heartbeat')] })
      : null;
    let appliedVersion: number | null = null;
    let onHeartbeat: ((v: number) => void) | null = null;
    events?.onEvent((e) => {
      if (e.channel !== 'heartbeat' || typeof e.data.config_version !== 'number') return;
      appliedVersion = Math.max(appliedVersion ?? 0, e.data.config_version);
      onHeartbeat?.(appliedVersion);
    });
    const config = await ctx.api.put<DeviceConfig>(`/devices/${encodeURIComponent(id)}/config`, body, { notFound: deviceNotFound(id) });
    if (!events) {
      ctx.out.json(config);
      ctx.out.id(String(config.version));
      ctx.out.line(`Configuration of ${id} is now v${config.version}; the device applies it at once if connected.`);
      printConfig(ctx, id, config);
      return;
    }
    ctx.out.line(`Configuration of ${id} is now v${config.version}; waiting for the device to apply it…`);
    const started = Date.now();
    await new Promise<void>((resolve, reject) => {
      const timer = timeout > 0
        ? setTimeout(() => reject(new CtlError(
            `${id} has not reported config v${config.version} after ${timeout} s (is it online? kernexctl devices get ${id})`,
            EXIT.timeout)), timeout * 1000)
        : undefined;
      const check = (v: number) => {
        if (v < config.version) return;
        clearTimeout(timer);
        resolve();
      };
      onHeartbeat = check;
      // A heartbeat may have come before the PUT returned; or the device may already report it.
      if (appliedVersion !== null) check(appliedVersion);
      void ctx.api.get<Device>(`/devices/${encodeURIComponent(id)}`).then((d) => {
        if (typeof d.config_version === 'number') check(d.config_version);
      }, () => {});
    });
    ctx.out.json({ ...config, applied: true });
    ctx.out.id(String(config.version));
    ctx.out.line(ctx.out.style(`✔ ${id} applied config v${config.version} after ${((Date.now() - started) / 1000).toFixed(1)} s`, 'green'));
    printConfig(ctx, id, config, config.version);
  }),
};

export const configCommand: CommandModule<GlobalArgs, GlobalArgs> = {
  command: 'config',
  describe: "a device's configuration: get, set",
  builder: (y: Argv<GlobalArgs>) => y
    .command(get)
    .command(set)
    .demandCommand(1, 'name a config command: get or set'),
  handler: () => {},
};
