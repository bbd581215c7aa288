// `npm run bench`: the benchmark suite. Each scenario starts what it measures
// (the controller as a child process `kernex server`, Mosquitto, a bare
// Aedes), drives it from this process with the fleet simulator, prints a
// table and writes everything to bench/results/<time>.json.
import { mkdir, writeFile } from 'node:fs/promises';
import { cpus, loadavg, totalmem } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import yargs from 'yargs';
import { hideBin } from 'yargs/helpers';
import { openFileLimit } from './harness/proc.js';
import { formatMarkdown, formatTable, type BenchContext, type Row, type ScenarioResult } from './report.js';
import { connections } from './scenarios/connections.js';
import { heartbeats } from './scenarios/heartbeats.js';
import { fanout } from './scenarios/fanout.js';
import { deploy } from './scenarios/deploy.js';
import { storm } from './scenarios/storm.js';

const SCENARIOS: Record<string, (ctx: BenchContext) => Promise<ScenarioResult>> = { connections, heartbeats, fanout, deploy, storm };

const argv = await yargs(hideBin(process.argv))
  .scriptName('npm run bench --')
  .option('quick', { type: 'boolean', default: false, describe: 'small sizes (about a minute)' })
  .option('only', { type: 'string', describe: `comma-separated scenarios: ${Object.keys(SCENARIOS).join(', ')}` })
  .option('devices', { type: 'number', describe: 'use this many devices in every scenario (smoke runs)' })
  .option('run-scripts', { type: 'boolean', default: false, describe: 'deploy: devices extract the bundle and spawn its no-op script' })
  .option('receivers', { type: 'number', default: 2, describe: 'fan-out: processes the receiving devices are spread over' })
  .option('out', { type: 'string', describe: 'JSON output file [bench/results/<time>.json]' })
  .strict()
  .help()
  .parseAsync();

const names = argv.only ? argv.only.split(',').map((s) => s.trim()) : Object.keys(SCENARIOS);
for (const name of names) {
  if (!SCENARIOS[name]) {
    process.stderr.write(`unknown scenario '${name}'; choose from ${Object.keys(SCENARIOS).join(', ')}\n`);
    process.exit(2);
  }
}

const ctx: BenchContext = {
  quick: argv.quick, devices: argv.devices, fdLimit: openFileLimit(), runScripts: argv.runScripts, receivers: Math.max(1, Math.floor(argv.receivers)),
  log: (m) => process.stderr.write(`${m}\n`),
};
const started = new Date();
const results: ScenarioResult[] = [];
let failed = false;
for (const name of names) {
  const t = performance.now();
  try {
    results.push(await SCENARIOS[name]!(ctx));
    ctx.log(`${name}: done in ${((performance.now() - t) / 1000).toFixed(1)} s\n`);
  } catch (err) {
    failed = true;
    ctx.log(`${name}: FAILED: ${(err as Error).stack ?? err}`);
    results.push({ name, rows: [], notes: [`failed: ${(err as Error).message}`], details: {} });
  }
}

const rows: Row[] = results.flatMap((r) => r.rows);
const root = resolve(dirname(new URL(import.meta.url).pathname), '..', '..');
const out = argv.out ? resolve(argv.out) : join(root, 'bench', 'results', `${started.toISOString().replace(/[:.]/g, '-')}.json`);
await mkdir(dirname(out), { recursive: true });
await writeFile(out, JSON.stringify({
  started_at: started.toISOString(), finished_at: new Date().toISOString(), quick: argv.quick, devices_override: argv.devices ?? null, run_scripts: argv.runScripts,
  machine: { cpus: cpus().length, cpu_model: cpus()[0]?.model, memory_bytes: totalmem(), load_average_at_start: loadavg(), node: process.version, open_file_limit: ctx.fdLimit },
  rows, scenarios: Object.fromEntries(results.map((r) => [r.name, { notes: r.notes, details: r.details }])),
  markdown: formatMarkdown(rows),
}, null, 2) + '\n');

process.stdout.write(`\n${formatTable(rows)}\n\n`);
for (const r of results) for (const n of r.notes) process.stdout.write(`${r.name}: ${n}\n`);
process.stdout.write(`\nresults written to ${out}\n`);
process.exit(failed ? 1 : 0);
