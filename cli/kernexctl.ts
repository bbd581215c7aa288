#!/usr/bin/env node
// kernexctl: the operator's command line for Kernex. Each command group lives
// in its own module under ./ctl; this file wires them to yargs and owns the
// global options, exit codes and help text.
import yargs from 'yargs';
import { hideBin } from 'yargs/helpers';
import pkg from '../package.json' with { type: 'json' };
import { bundlesCommand } from './ctl/bundles.js';
import { complete } from './ctl/completion.js';
import { configCommand } from './ctl/config.js';
import { deployCommand, deploymentsCommand, rollbackCommand } from './ctl/deploy.js';
import { devicesCommand } from './ctl/devices.js';
import { reportError } from './ctl/command.js';
import { EXIT } from './ctl/errors.js';
import { handleInterrupts } from './ctl/interrupt.js';
import { statusCommand } from './ctl/status.js';
import { watchCommand } from './ctl/watch.js';

const EPILOGUE = `Credentials, first found wins:
  --server/--token, then KERNEX_SERVER/KERNEX_TOKEN (and KERNEX_MQTT_URL),
  then <data dir>/credentials.json written by a controller on this machine
  (data dir: --data-dir, KERNEX_DATA_DIR, or ./.kernex). Its token is only
  sent to the server that file names.

Output: tables for people; --json prints one JSON document (watch: one per
line); --quiet prints only ids. Errors are one line on stderr.

Exit codes:
  0  done (a deployment: every device succeeded)
  1  it ran and failed (a device failed or timed out; controller error)
  2  usage: bad arguments, invalid manifest, request refused (400/404/409)
  3  controller or MQTT broker unreachable
  4  token missing, refused (401) or not allowed (403)
  5  --wait gave up after --timeout; the deployment goes on
  130 interrupted`;

// A reader that went away (`kernexctl watch | head`) ends kernexctl quietly,
// and anything unforeseen is still one line, not a stack (unless --verbose).
const verbose = process.argv.includes('--verbose') || process.argv.includes('-v');
process.stdout.on('error', (err: NodeJS.ErrnoException) => {
  if (err.code === 'EPIPE') process.exit(EXIT.ok);
  process.exit(reportError(err, verbose));
});
const crash = (err: unknown) => process.exit(reportError(err, verbose));
process.on('uncaughtException', crash);
process.on('unhandledRejection', crash);
handleInterrupts();

const GROUPS: Record<string, string[]> = {
  status: [], deploy: [], rollback: [], watch: [], completion: [],
  devices: ['list', 'ls', 'get', 'history'], device: ['list', 'ls', 'get', 'history'],
  bundles: ['pack', 'sign', 'upload', 'list', 'ls', 'get'], bundle: ['pack', 'sign', 'upload', 'list', 'ls', 'get'],
  deployments: ['list', 'ls', 'get', 'wait'], deployment: ['list', 'ls', 'get', 'wait'],
  config: ['get', 'set'],
};

/** The command words the user typed, as far as they name real commands ("devices get "). */
function helpFor(args: string[]): string {
  const words = args.filter((a) => !a.startsWith('-'));
  const group = words[0];
  if (!group || !(group in GROUPS)) return '';
  const sub = words[1];
  return sub && GROUPS[group]!.includes(sub) ? `${group} ${sub} ` : `${group} `;
}

const cli = yargs(hideBin(process.argv))
  .scriptName('kernexctl')
  .usage('$0 <command> [options]\n\nOperate a Kernex fleet: devices, bundles, deployments, rollbacks, configuration.')
  .version(pkg.version)
  // Declared first so each command's own options are listed before the global ones.
  .group(['help', 'version'], 'Options:')
  .option('server', { type: 'string', describe: 'controller URL [KERNEX_SERVER]', global: true, group: 'Connection:' })
  .option('token', { type: 'string', describe: 'API token [KERNEX_TOKEN]', global: true, group: 'Connection:' })
  .option('mqtt-url', { type: 'string', describe: 'MQTT broker URL for live events [KERNEX_MQTT_URL; default: asked from the controller]', global: true, group: 'Connection:' })
  .option('data-dir', { type: 'string', describe: 'local controller data dir holding credentials.json [KERNEX_DATA_DIR, ./.kernex]', global: true, group: 'Connection:' })
  .option('json', { type: 'boolean', describe: 'machine-readable JSON output', global: true, group: 'Output:' })
  .option('quiet', { alias: 'q', type: 'boolean', describe: 'print only ids', global: true, group: 'Output:' })
  .option('verbose', { alias: 'v', type: 'boolean', describe: 'print requests, and stack traces on errors', global: true, group: 'Output:' })
  .conflicts('json', 'quiet')
  .command(statusCommand)
  .command(devicesCommand)
  .command(bundlesCommand)
  .command(deployCommand)
  .command(rollbackCommand)
  .command(deploymentsCommand)
  .command(configCommand)
  .command(watchCommand)
  .completion('completion', 'print a shell completion script (bash, zsh): kernexctl completion >> ~/.bashrc', complete)
  .demandCommand(1, 'name a command')
  .recommendCommands()
  .strict()
  .help()
  .alias('help', 'h')
  .epilogue(EPILOGUE)
  .wrap(Math.min(110, process.stdout.columns || 100))
  .fail((message, err, y) => {
    if (err) throw err;
    process.stderr.write(`kernexctl: ${message}\n`);
    process.stderr.write(`Run 'kernexctl ${helpFor(hideBin(process.argv))}--help' for usage.\n`);
    void y;
    process.exit(EXIT.usage);
  });

await cli.parseAsync();
// Keep-alive sockets and timers must not hold the exit back. Completion
// answers on its own schedule (it may ask the controller), and then ends.
if (!process.argv.includes('--get-yargs-completions')) process.exit(process.exitCode ?? EXIT.ok);

