// The benchmark harness itself, at a size that proves it works and nothing
// more (the real runs are `npm run bench`, never part of the tests): one
// scenario, ten devices, a controller child process, Mosquitto as reference.
import { execFile } from 'node:child_process';
import { mkdtemp, readFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { promisify } from 'node:util';
import { hasProgram } from './support/programs.js';

const run = promisify(execFile);
const testIf = hasProgram('mosquitto') ? test : test.skip;

testIf('npm run bench runs the fan-out scenario with 10 devices and writes its JSON', async () => {
  const out = join(await mkdtemp(join(tmpdir(), 'kernex-bench-smoke-')), 'result.json');
  const { stdout } = await run(process.execPath, [resolve('dist/bench/index.js'), '--only', 'fanout', '--devices', '10', '--out', out]);
  expect(stdout).toContain('fan-out 10');
  const result = JSON.parse(await readFile(out, 'utf8'));
  expect(result.devices_override).toBe(10);
  const rows = result.rows as Array<{ scenario: string; metric: string; kernex: number; reference: { name: string; value: number } }>;
  expect(rows.map((r) => r.metric)).toEqual(['p50 API call → device', 'p99 API call → device', 'max API call → device']);
  for (const row of rows) {
    expect(row.scenario).toBe('fan-out 10');
    expect(row.kernex).toBeGreaterThan(0);
    expect(row.reference).toEqual({ name: 'mosquitto', value: expect.any(Number) });
    expect(row.reference.value).toBeGreaterThan(0);
  }
  // Every device received every round's command, through both brokers.
  expect(result.scenarios.fanout.details['10'].kernex.count).toBe(20);
  expect(result.scenarios.fanout.details['10'].mosquitto.count).toBe(20);
});
