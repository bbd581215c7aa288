// kernexctl deploy | rollback | deployments list|get|wait
import type { Argv, CommandModule } from 'yargs';
import { looksLikeBundleId } from './bundles.js';
import { deviceId, positiveInt, run, splitList } from './command.js';
import type { Context, GlobalArgs } from './context.js';
import { usageError } from './errors.js';
import { printDeviceStates, report, startAndFollow } from './follow.js';
import { dash, formatAge } from './output.js';
import type { Deployment, Device } from './types.js';

interface TargetArgs extends GlobalArgs {
  devices?: string[];
  all?: boolean;
  wait: boolean;
  timeout: number;
  executionTimeout?: number;
}

const DEFAULT_TIMEOUT = 600;

function targetOptions<T>(y: Argv<T>) {
  return y
    .option('devices', {
      alias: 'd', type: 'string', array: true,
      describe: 'target device ids, comma-separated or repeated',
    })
    .option('all', { type: 'boolean', describe: 'target every registered device' })
    .option('wait', { alias: 'w', type: 'boolean', default: false, describe: 'follow live progress until every device has finished' })
    .option('timeout', {
      type: 'number', default: DEFAULT_TIMEOUT,
      describe: 'with --wait: seconds to wait before giving up (exit 5; the deployment goes on); 0 = no limit',
    })
    .option('execution-timeout', {
      type: 'number',
      describe: 'seconds after which the controller marks a device that has not finished as timed_out',
    })
    .conflicts('devices', 'all');
}

/** The optional server-side timeout, as the request body field. */
function executionTimeout(argv: TargetArgs): { timeout_seconds?: number } {
  if (argv.executionTimeout === undefined) return {};
  const n = positiveInt(argv.executionTimeout, '--execution-timeout');
  if (n < 1) throw usageError('--execution-timeout must be at least 1 second');
  return { timeout_seconds: n };
}

async function targets(ctx: Context, argv: TargetArgs): Promise<string[]> {
  if (argv.all) {
    const ids = (await ctx.api.get<Device[]>('/devices')).map((d) => d.device_id);
    if (!ids.length) throw usageError('--all: no devices are registered yet');
    return ids;
  }
  const ids = splitList(argv.devices).map(deviceId);
  if (!ids.length) throw usageError('name the target devices with --devices a,b,c (or --all)');
  return ids;
}

/** A 400 for an unknown device says which, and where to look. */
const withHints = (err: unknown): never => {
  if (err instanceof Error) {
    if (/unknown device/i.test(err.message)) err.message += '; `kernexctl devices list` shows the registered devices';
    else if (/bundle .* does not exist/i.test(err.message)) err.message += '; `kernexctl bundles list` shows the uploaded bundles';
    else if (/history/i.test(err.message)) err.message += '; `kernexctl devices history <id>` shows what each device ran';
  }
  throw err;
};

const deploy: CommandModule<GlobalArgs, TargetArgs & { bundle: string }> = {
  command: 'deploy <bundle>',
  describe: 'deploy a bundle (by version or id) to devices',
  builder: (y) => targetOptions(y.positional('bundle', { type: 'string', demandOption: true, describe: 'bundle version or id' }))
    .example('$0 deploy 1.2.0 -d dev-1,dev-2 --wait', 'deploy, follow each device')
    .example('$0 deploy 1.2.0 --all -w --timeout 120', 'whole fleet; stop waiting after 2 min')
    .example('$0 deploy 1.2.0 -d dev-1 -w --json', 'the final state as JSON'),
  handler: run(async (ctx, argv) => {
    const ids = await targets(ctx, argv);
    const ref = argv.bundle;
    const body = {
      ...(looksLikeBundleId(ref) ? { bundle_id: ref } : { bundle_version: ref }),
      target_device_ids: ids, ...executionTimeout(argv),
    };
    return startAndFollow(ctx, () => ctx.api.post<Deployment>('/deployments', body).catch(withHints), {
      wait: argv.wait, timeoutSeconds: positiveInt(argv.timeout, '--timeout'),
    });
  }),
};

const rollback: CommandModule<GlobalArgs, TargetArgs & { 'bundle-version': string }> = {
  command: 'rollback <bundle-version>',
  describe: 'roll devices back to a version they once ran successfully',
  builder: (y) => targetOptions(y.positional('bundle-version', { type: 'string', demandOption: true, describe: 'bundle version to return to' }))
    .example('$0 rollback 1.1.0 --devices dev-1 --wait', 'back to 1.1.0, following progress')
    .example('$0 devices history dev-1', 'which versions dev-1 ran successfully'),
  handler: run(async (ctx, argv) => {
    const ids = await targets(ctx, argv);
    return startAndFollow(ctx, async () => {
      const created = await ctx.api
        .post<Deployment>('/devices/rollback', {
          bundle_version: argv['bundle-version'], target_device_ids: ids, ...executionTimeout(argv),
        })
        .catch(withHints);
      return { kind: 'rollback', ...created };
    }, { wait: argv.wait, timeoutSeconds: positiveInt(argv.timeout, '--timeout') });
  }),
};

const list: CommandModule<GlobalArgs, GlobalArgs & { limit: number }> = {
  command: ['list', 'ls'],
  describe: 'recent deployments and rollbacks, newest first',
  builder: (y) => y.option('limit', { type: 'number', default: 20, describe: 'how many (1-1000)' }),
  handler: run(async (ctx, argv) => {
    const deps = await ctx.api.get<Deployment[]>('/deployments', { query: { limit: argv.limit } });
    ctx.out.json(deps);
    for (const d of deps) ctx.out.id(d.deployment_id);
    if (!deps.length) {
      ctx.out.line('No deployments yet: kernexctl deploy <version> --devices <ids> --wait');
      return;
    }
    ctx.out.table<Deployment>([
      { header: 'DEPLOYMENT', value: (d) => d.deployment_id },
      { header: 'KIND', value: (d) => dash(d.kind) },
      { header: 'VERSION', value: (d) => d.bundle_version },
      { header: 'STATUS', value: (d) => d.status, style: (d) => ctx.out.statusStyle(d.status) },
      { header: 'DONE', value: (d) => `${d.finished ?? '?'}/${d.total ?? d.target_device_ids.length}` },
      { header: 'FAILED', value: (d) => dash(d.failed) },
      { header: 'CREATED', value: (d) => formatAge(d.created_at) },
    ], deps);
  }),
};

const deploymentNotFound = (id: string) => () =>
  `deployment ${id} not found: \`kernexctl deployments list\` shows recent ones`;

const get: CommandModule<GlobalArgs, GlobalArgs & { id: string }> = {
  command: 'get <id>',
  describe: 'one deployment with the state of each device',
  builder: (y) => y.positional('id', { type: 'string', demandOption: true, describe: 'deployment id' }),
  handler: run(async (ctx, argv) => {
    const d = await ctx.api.get<Deployment>(`/deployments/${encodeURIComponent(argv.id)}`, { notFound: deploymentNotFound(argv.id) });
    ctx.out.json(d);
    ctx.out.id(d.deployment_id);
    ctx.out.fields([
      ['Deployment', d.deployment_id],
      ['Kind', dash(d.kind)],
      ['Bundle', `${d.bundle_version} (${dash(d.bundle_id)})`],
      ['Status', ctx.out.style(d.status, ctx.out.statusStyle(d.status))],
      ['Progress', `${d.finished ?? '?'}/${d.total ?? d.target_device_ids.length} finished, ${d.succeeded ?? 0} succeeded, ${d.failed ?? 0} failed`],
      ['Created', dash(d.created_at)],
      ['Finished', dash(d.finished_at)],
    ]);
    printDeviceStates(ctx, d.devices ?? []);
  }),
};

const wait: CommandModule<GlobalArgs, GlobalArgs & { id: string; timeout: number }> = {
  command: 'wait <id>',
  describe: 'follow a running deployment until it finishes (exit 0 success, 1 failed)',
  builder: (y) => y
    .positional('id', { type: 'string', demandOption: true, describe: 'deployment id' })
    .option('timeout', { type: 'number', default: DEFAULT_TIMEOUT, describe: 'seconds to wait (exit 5 after); 0 = no limit' }),
  handler: run(async (ctx, argv) => {
    const get = () => ctx.api.get<Deployment>(`/deployments/${encodeURIComponent(argv.id)}`, { notFound: deploymentNotFound(argv.id) });
    const first = await get();
    if (first.finished_at) return report(ctx, first);
    return startAndFollow(ctx, get, { wait: true, timeoutSeconds: positiveInt(argv.timeout, '--timeout') });
  }),
};

export const deployCommand = deploy;
export const rollbackCommand = rollback;

export const deploymentsCommand: CommandModule<GlobalArgs, GlobalArgs> = {
  command: ['deployments', 'deployment'],
  describe: 'deployments and rollbacks: list, inspect, wait for one',
  builder: (y: Argv<GlobalArgs>) => y
    .command(list)
    .command(get)
    .command(wait)
    .demandCommand(1, 'name a deployments command: list, get or wait'),
  handler: () => {},
};
