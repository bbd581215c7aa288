// kernexctl end to end: the real executable as a subprocess, against a real
// controller on loopback and real agent processes running real scripts.
import { createHash, randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { chmod, mkdir, mkdtemp, readFile, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { execFile } from 'node:child_process';
import * as tar from 'tar';
import pkg from '../package.json' with { type: 'json' };
import { startTestController, waitFor, type TestController } from './support/controller.js';
import { startAgentProcess, type AgentProcess } from './support/agent.js';
import { ctlEnv, jsonLines, kernexctl, KERNEXCTL_BIN, spawnKernexctl, type CtlProcess } from './support/kernexctl.js';
import { hasProgram } from './support/programs.js';
import { freePort } from './support/ports.js';

const tc: TestController = await startTestController();
// Rollback, device config and bundle history come with issue #3; until that
// API is on the controller, the tests that need it say so and skip.
const probe = await tc.api.get('/devices/probe/bundle-history');
const hasRollbackApi = !(probe.status === 404 && /no route/.test(String(probe.body?.message)));
if (!hasRollbackApi) {
  process.stderr.write('SKIPPED: this controller has no bundle-history/rollback/config API yet (issue #3); those kernexctl tests wait for it\n');
}
const withRollbackApi = hasRollbackApi ? test : test.skip;

let work: string;
const agents: AgentProcess[] = [];
const running: CtlProcess[] = [];
/** Found the way an operator on the controller's machine finds it: <data dir>/credentials.json. */
const local = () => ({ KERNEX_DATA_DIR: tc.dataDir });
const ctl = (...args: string[]) => kernexctl(args, { env: local() });

async function agent(deviceId: string): Promise<AgentProcess> {
  const a = await startAgentProcess({ deviceId, server: tc.controller.httpUrl, enrollmentToken: tc.creds.enrollment_token });
  agents.push(a);
  await waitFor(async () => (await tc.api.get(`/devices/${deviceId}`)).body.status === 'online', `${deviceId} online`)
    .catch((err: Error) => {
      throw new Error(`${err.message}\nagent output:\n${a.output()}`);
    });
  return a;
}

/** A bundle directory whose scripts append to `out` on the device. */
async function bundleDir(version: string, out: string, opts: { exit?: number; manifest?: unknown; skipScript?: boolean } = {}) {
  const dir = await mkdtemp(join(work, `src-${version}-`));
  await writeFile(join(dir, 'manifest.json'), JSON.stringify(opts.manifest ?? {
    name: 'demo-app', version, deploy: { script: 'bin/deploy.sh' }, rollback: { script: 'bin/rollback.sh' },
  }));
  await mkdir(join(dir, 'bin'));
  await mkdir(join(dir, 'payload'));
  if (!opts.skipScript) {
    await writeFile(join(dir, 'bin/deploy.sh'), `#!/bin/sh\necho "deploying ${version}"\necho "deploy ${version}" >> "${out}"\nexit ${opts.exit ?? 0}\n`);
    await chmod(join(dir, 'bin/deploy.sh'), 0o755);
  }
  await writeFile(join(dir, 'bin/rollback.sh'), `#!/bin/sh\necho "rollback ${version}" >> "${out}"\n`);
  await writeFile(join(dir, 'payload/app.txt'), `app ${version}\n`);
  return dir;
}

beforeAll(async () => {
  work = await mkdtemp(join(tmpdir(), 'kernexctl-e2e-'));
  await Promise.all([agent('dev-a'), agent('dev-b')]);
});

afterAll(async () => {
  await Promise.all(running.map((p) => p.stop('SIGKILL')));
  await Promise.all(agents.map((a) => a.stop()));
  await tc.stop();
});

describe('discoverable', () => {
  test('--help on every level shows commands, options and examples; --version the package version', async () => {
    // Independent runs, side by side.
    const [top, deploy, sub, version] = await Promise.all([
      ctl('--help'), ctl('deploy', '--help'), ctl('devices', 'history', '--help'), ctl('--version'),
    ]);
    expect(top.code).toBe(0);
    for (const cmd of ['status', 'devices', 'bundles', 'deploy', 'rollback', 'deployments', 'config', 'watch', 'completion']) {
      expect(top.stdout).toContain(`kernexctl ${cmd}`);
    }
    expect(top.stdout).toMatch(/Exit codes:/);
    expect(top.stdout).toContain('credentials.json');

    expect(deploy.code).toBe(0);
    expect(deploy.stdout).toContain('--wait');
    expect(deploy.stdout).toContain('Examples:');
    expect(sub.stdout).toContain('--limit');
    expect(version.stdout.trim()).toBe(pkg.version);
  });

  test('shell completion: a script to install, and completions for subcommands', async () => {
    const [script, words, devices, flagValue] = await Promise.all([
      ctl('completion'),
      ctl('--get-yargs-completions', 'bundles', ''),
      ctl('--get-yargs-completions', 'devices', 'get', 'dev-'),
      ctl('--get-yargs-completions', 'deploy', '1.0.0', '--devices', 'dev-b'),
    ]);
    expect(script.code).toBe(0);
    expect(script.stdout).toContain('--get-yargs-completions');
    expect(script.stdout).toContain('kernexctl');
    expect(words.stdout.split('\n')).toEqual(expect.arrayContaining(['pack', 'upload', 'list', 'get']));
    // Device ids come from the controller.
    expect(devices.stdout).toBe('dev-a\ndev-b\n');
    expect(flagValue.stdout).toBe('dev-b\n');
  });
});

describe('the operator workflow', () => {
  const state: { packed?: string; packSha?: string; v1Id?: string; out?: string } = {};

  test('status: the controller is reachable, its version, devices by status, nothing running', async () => {
    const human = await ctl('status');
    expect(human.code).toBe(0);
    expect(human.stdout).toContain('reachable');
    expect(human.stdout).toContain(`Kernex ${pkg.version}`);
    expect(human.stdout).toMatch(/2 total: 2 online, 0 offline, 0 error/);

    const res = await ctl('status', '--json');
    expect(res.code).toBe(0);
    expect(JSON.parse(res.stdout)).toEqual({
      server: tc.controller.httpUrl, reachable: true, version: pkg.version, mqtt_url: tc.controller.mqttUrl,
      devices: { total: 2, online: 2, offline: 0, error: 0 }, running_deployments: [],
    });
  });

  test('devices list: a table for people, JSON for scripts, ids with --quiet', async () => {
    const [human, jsonRun, quiet, offline, oneRun] = await Promise.all([
      ctl('devices', 'list'), ctl('devices', 'list', '--json'), ctl('devices', 'list', '-q'),
      ctl('devices', 'list', '--status', 'offline', '--json'), ctl('devices', 'get', 'dev-a', '--json'),
    ]);
    expect(human.code).toBe(0);
    const lines = human.stdout.trim().split('\n');
    expect(lines[0]).toMatch(/^DEVICE\s+STATUS\s+BUNDLE\s+CONFIG\s+LAST HEARTBEAT\s+VIA$/);
    expect(lines.slice(1)).toEqual([expect.stringMatching(/^dev-a\s+online\s/), expect.stringMatching(/^dev-b\s+online\s/)]);
    // Aligned: every row's STATUS column starts where the header's does.
    const at = lines[0]!.indexOf('STATUS');
    for (const l of lines.slice(1)) expect(l.indexOf('online')).toBe(at);

    const json = JSON.parse(jsonRun.stdout);
    expect(json).toEqual([
      expect.objectContaining({ device_id: 'dev-a', status: 'online', connection: 'mqtt', last_heartbeat: expect.any(String) }),
      expect.objectContaining({ device_id: 'dev-b', status: 'online' }),
    ]);
    expect(quiet.stdout).toBe('dev-a\ndev-b\n');
    expect(JSON.parse(offline.stdout)).toEqual([]);

    const one = JSON.parse(oneRun.stdout);
    expect(one).toMatchObject({ device_id: 'dev-a', status: 'online' });
    expect(one.token_hash).toBeUndefined();
  });

  test('bundles pack checks the directory and writes a .tar.gz holding the bundle', async () => {
    state.out = join(work, 'device-a.out');
    const dir = await bundleDir('1.0.0', state.out);
    const file = join(work, 'demo-1.0.0.tar.gz');
    const res = await ctl('bundles', 'pack', dir, '-o', file, '--json');
    expect(res.code).toBe(0);
    const packed = JSON.parse(res.stdout);
    const bytes = await readFile(file);
    expect(packed).toEqual({
      file, name: 'demo-app', version: '1.0.0', size: bytes.length, files: 4,
      sha256: createHash('sha256').update(bytes).digest('hex'),
    });
    const entries: string[] = [];
    await tar.t({ file, onReadEntry: (e) => entries.push(e.path) });
    expect(entries).toEqual(expect.arrayContaining(['manifest.json', 'bin/deploy.sh', 'bin/rollback.sh', 'payload/app.txt']));
    state.packed = file;
    state.packSha = packed.sha256;

    // Without -o: <name>-<version>.tar.gz in the current directory, said in a sentence.
    const here = await mkdtemp(join(work, 'cwd-'));
    const human = await kernexctl(['bundles', 'pack', dir], { env: local(), cwd: here });
    expect(human.code).toBe(0);
    expect(human.stdout).toMatch(/^Packed demo-app 1\.0\.0 → demo-app-1\.0\.0\.tar\.gz \(4 files, .* sha256 [0-9a-f]{12}…\)\n$/);
    expect(existsSync(join(here, 'demo-app-1.0.0.tar.gz'))).toBe(true);
  });

  test('bundles upload: a file, or a directory packed on the way; list shows both', async () => {
    const res = await ctl('bundles', 'upload', state.packed!, '--json');
    expect(res.code).toBe(0);
    expect(res.stderr).toBe('');
    const bundle = JSON.parse(res.stdout);
    expect(bundle).toMatchObject({ id: expect.any(String), version: '1.0.0', name: 'demo-app', sha256: state.packSha });
    state.v1Id = bundle.id;

    const v2 = await ctl('bundles', 'upload', await bundleDir('2.0.0', state.out!), '-q');
    expect(v2.code).toBe(0);
    expect(v2.stdout).toMatch(/^[0-9a-f-]{36}\n$/);

    const listed = JSON.parse((await ctl('bundles', 'list', '--json')).stdout);
    expect(listed.map((b: { version: string }) => b.version)).toEqual(['2.0.0', '1.0.0']);
    const human = (await ctl('bundles', 'list')).stdout;
    expect(human).toMatch(/^VERSION\s+NAME\s+SIZE\s+SHA256\s+UPLOADED\s+ID\n2\.0\.0\s+demo-app/);

    const dup = await ctl('bundles', 'upload', state.packed!);
    expect(dup.code).toBe(2);
    expect(dup.stderr).toBe('kernexctl: bundle version 1.0.0 already exists\n');
  });

  test('deploy --wait follows each device live and exits 0 when all succeeded', async () => {
    const res = await ctl('deploy', '1.0.0', '--devices', 'dev-a,dev-b', '--wait');
    expect(res.stderr).toBe('');
    expect(res.code).toBe(0);
    expect(res.stdout).toMatch(/^Deployment [0-9a-f-]{36}: deploying 1\.0\.0 on 2 device\(s\)\n/);
    for (const d of ['dev-a', 'dev-b']) {
      expect(res.stdout).toMatch(new RegExp(`\\d\\d:\\d\\d:\\d\\d\\.\\d{3}  ${d}  success`));
      expect(res.stdout).toMatch(new RegExp(`^${d}\\s+success\\s+0\\s+`, 'm'));
    }
    expect(res.stdout).toContain('✔ deployment of 1.0.0 succeeded on 2/2 device(s)');
    // The script really ran on the devices.
    expect((await readFile(state.out!, 'utf8')).match(/deploy 1\.0\.0/g)).toHaveLength(2);
  });

  test('deploy --wait --json prints the final deployment, by bundle id too', async () => {
    const res = await ctl('deploy', state.v1Id!, '-d', 'dev-b', '--wait', '--json');
    expect(res.code).toBe(0);
    const dep = JSON.parse(res.stdout);
    expect(dep).toMatchObject({
      deployment_id: expect.any(String), kind: 'deploy', bundle_id: state.v1Id, bundle_version: '1.0.0', status: 'success',
      total: 1, succeeded: 1, failed: 0, finished_at: expect.any(String),
    });
    expect(dep.devices).toEqual([expect.objectContaining({ device_id: 'dev-b', status: 'success', exit_code: 0 })]);

    const v2 = JSON.parse((await ctl('deploy', '2.0.0', '-d', 'dev-a', '-w', '--json')).stdout);
    expect(v2).toMatchObject({ status: 'success', bundle_version: '2.0.0' });
    expect(JSON.parse((await ctl('devices', 'get', 'dev-a', '--json')).stdout).current_bundle_version).toBe('2.0.0');
  });

  test('deploy without --wait returns at once with the id; deployments wait/get/list follow it up', async () => {
    const created = await ctl('deploy', '2.0.0', '-d', 'dev-b', '-q');
    expect(created.code).toBe(0);
    const id = created.stdout.trim();
    expect(id).toMatch(/^[0-9a-f-]{36}$/);
    const waited = await ctl('deployments', 'wait', id, '--json');
    expect(waited.code).toBe(0);
    expect(JSON.parse(waited.stdout)).toMatchObject({ deployment_id: id, status: 'success' });

    const got = await ctl('deployments', 'get', id);
    expect(got.stdout).toMatch(/Status\s+success/);
    expect(got.stdout).toMatch(/^dev-b\s+success\s+0/m);
    const listed = JSON.parse((await ctl('deployments', 'list', '--json')).stdout);
    expect(listed[0]).toMatchObject({ deployment_id: id, status: 'success' });
  });

  test('a failing script: --wait shows the failure and exits 1', async () => {
    const out = join(work, 'fail.out');
    expect((await ctl('bundles', 'upload', await bundleDir('3.0.0-bad', out, { exit: 3 }), '-q')).code).toBe(0);
    const res = await ctl('deploy', '3.0.0-bad', '-d', 'dev-b', '--wait');
    expect(res.code).toBe(1);
    expect(res.stdout).toMatch(/dev-b  failed: .*exited with 3/);
    expect(res.stdout).toMatch(/^dev-b\s+failed\s+3\s+/m);
    expect(res.stdout).toContain('✘ deployment of 3.0.0-bad failed on 1 of 1 device(s)');

    const json = await ctl('deploy', '3.0.0-bad', '-d', 'dev-b', '--wait', '--json');
    expect(json.code).toBe(1);
    expect(JSON.parse(json.stdout)).toMatchObject({ status: 'failed', failed: 1, devices: [expect.objectContaining({ exit_code: 3 })] });
  });

  withRollbackApi('devices history lists what each device ran, most recent first', async () => {
    const res = await ctl('devices', 'history', 'dev-a', '--json');
    expect(res.code).toBe(0);
    const entries = JSON.parse(res.stdout);
    expect(entries.map((e: { bundle_version: string; status: string }) => [e.bundle_version, e.status]))
      .toEqual([['2.0.0', 'success'], ['1.0.0', 'success']]);
    expect(entries[0]).toMatchObject({ device_id: 'dev-a', deployment_id: expect.any(String), deployed_at: expect.any(String) });
    const human = await ctl('devices', 'history', 'dev-a', '--limit', '1');
    expect(human.stdout).toMatch(/^DEPLOYED\s+VERSION\s+KIND\s+STATUS/);
    expect(human.stdout.trim().split('\n')).toHaveLength(2);
  });

  withRollbackApi('rollback --wait runs the old version\'s rollback script and exits 0', async () => {
    const res = await ctl('rollback', '1.0.0', '--devices', 'dev-a', '--wait');
    expect(res.stderr).toBe('');
    expect(res.code).toBe(0);
    expect(res.stdout).toMatch(/rolling back to 1\.0\.0 on 1 device\(s\)/);
    expect(res.stdout).toContain('✔ rollback to 1.0.0 succeeded on 1/1 device(s)');
    expect(await readFile(state.out!, 'utf8')).toContain('rollback 1.0.0');
    const history = JSON.parse((await ctl('devices', 'history', 'dev-a', '--json')).stdout);
    expect(history.map((e: { bundle_version: string; status: string }) => [e.bundle_version, e.status]))
      .toEqual([['1.0.0', 'success'], ['2.0.0', 'rolled_back'], ['1.0.0', 'success']]);
    expect(JSON.parse((await ctl('devices', 'get', 'dev-a', '--json')).stdout).current_bundle_version).toBe('1.0.0');

    const refused = await ctl('rollback', '3.0.0-bad', '-d', 'dev-b');
    expect(refused.code).toBe(2);
    expect(refused.stderr).toMatch(/^kernexctl: .*3\.0\.0-bad.*\n$/);
  });

  withRollbackApi('config set pushes the change; watch sees the device apply it', async () => {
    const watch = spawnKernexctl(['watch', '--device', 'dev-a', '--json'], { env: local() });
    running.push(watch);
    // Subscribed once its first heartbeat arrives (agents beat every second).
    await waitFor(() => jsonLines(watch.stdout()).some((l) => l.type === 'heartbeat'), 'watch to see a heartbeat');

    const set = await ctl('config', 'set', 'dev-a', 'polling_interval=2', 'log_level=debug', '--json');
    expect(set.code).toBe(0);
    const config = JSON.parse(set.stdout);
    expect(config).toMatchObject({ polling_interval: 2, log_level: 'DEBUG', version: expect.any(Number) });

    const applied = await waitFor(
      () => jsonLines<{ type: string; device_id: string; config_version?: number }>(watch.stdout())
        .find((l) => l.type === 'config.applied' && l.config_version === config.version),
      'watch to report the config applied',
    );
    expect(applied.device_id).toBe('dev-a');
    const lines = jsonLines<{ type: string; device_id: string; data?: { config_version?: number } }>(watch.stdout());
    expect(lines.some((l) => l.type === 'heartbeat' && l.data?.config_version === config.version)).toBe(true);
    expect(lines.every((l) => l.device_id === 'dev-a')).toBe(true);
    expect(await watch.stop('SIGINT')).toBe(0);

    const got = await ctl('config', 'get', 'dev-a', '--json');
    expect(JSON.parse(got.stdout)).toMatchObject({ version: config.version, polling_interval: 2, log_level: 'DEBUG' });
    const human = await ctl('config', 'get', 'dev-a');
    expect(human.stdout).toMatch(/Applied\s+yes/);

    const waited = await ctl('config', 'set', 'dev-a', 'polling_interval=1', '--wait');
    expect(waited.code).toBe(0);
    expect(waited.stdout).toMatch(/✔ dev-a applied config v\d+ after/);
  });

  test('watch shows a deployment as it happens, as a person reads it', async () => {
    const watch = spawnKernexctl(['watch', '--only', 'deployments,results'], { env: local() });
    running.push(watch);
    await waitFor(() => watch.stderr().includes('Watching the fleet'), 'watch to start');
    expect((await ctl('deploy', '1.0.0', '--all', '--wait', '-q')).code).toBe(0);
    await waitFor(() => /finished success: 2\/2 succeeded/.test(watch.stdout()), 'the finished event in watch');
    expect(watch.stdout()).toMatch(/created: 1\.0\.0 to 2 device\(s\)/);
    expect(watch.stdout()).toMatch(/dev-a\s+result\s+\S+ success exit=0/);
    expect(watch.stdout()).toMatch(/dev-b\s+result\s+\S+ success exit=0/);
    expect(watch.stdout()).not.toMatch(/heartbeat/);
    expect(await watch.stop('SIGTERM')).toBe(0);
  });

  test('watch piped into a reader that stops early (| head) ends quietly', async () => {
    const watch = spawnKernexctl(['watch', '--only', 'heartbeat'], { env: local() });
    running.push(watch);
    await waitFor(() => watch.stdout().includes('heartbeat'), 'a heartbeat line');
    watch.child.stdout!.destroy();
    expect(await watch.exited).toBe(0);
    expect(watch.stderr()).not.toMatch(/EPIPE|\n\s+at /);
  });
});

describe('errors: one line saying what to do, and an exit code', () => {
  const noStack = (stderr: string) => {
    expect(stderr.trim().split('\n')).toHaveLength(1);
    expect(stderr).not.toMatch(/\n\s+at /);
  };

  test('unreachable controller: exit 3; --verbose adds the stack', async () => {
    const port = await freePort();
    const res = await kernexctl(['status', '--server', `http://127.0.0.1:${port}`, '--token', 'x']);
    expect(res.code).toBe(3);
    expect(res.stderr).toBe(`kernexctl: cannot reach the controller at http://127.0.0.1:${port} (ECONNREFUSED): ` +
      'is it running? Point kernexctl at it with --server or KERNEX_SERVER\n');
    noStack(res.stderr);
    const verbose = await kernexctl(['devices', 'list', '--server', `http://127.0.0.1:${port}`, '--token', 'x', '--verbose']);
    expect(verbose.code).toBe(3);
    expect(verbose.stderr).toMatch(/\n\s+at /);
  });

  test('bad token: exit 4, and where the token came from', async () => {
    const res = await kernexctl(['devices', 'list', '--token', 'kxt_not-a-real-token'], { env: local() });
    expect(res.code).toBe(4);
    expect(res.stderr).toMatch(/^kernexctl: the controller refused the token \(.*\): the token from --token is not valid here;/);
    noStack(res.stderr);
    const env = await kernexctl(['devices', 'list'], { env: { KERNEX_SERVER: tc.controller.httpUrl, KERNEX_TOKEN: 'kxt_nope' } });
    expect(env.code).toBe(4);
    expect(env.stderr).toContain('the token from KERNEX_TOKEN is not valid here');
  });

  test('KERNEX_SERVER/KERNEX_TOKEN work without any credentials file', async () => {
    const empty = await mkdtemp(join(work, 'nodata-'));
    const res = await kernexctl(['devices', 'list', '-q'], {
      env: { KERNEX_SERVER: tc.controller.httpUrl, KERNEX_TOKEN: tc.creds.token, KERNEX_DATA_DIR: empty },
    });
    expect(res.code).toBe(0);
    expect(res.stdout).toBe('dev-a\ndev-b\n');
  });

  test('the local credential file is never sent to another server', async () => {
    const port = await freePort();
    const res = await kernexctl(['devices', 'list', '--server', `http://127.0.0.1:${port}`], { env: local() });
    expect(res.code).toBe(4);
    expect(res.stderr).toMatch(/^kernexctl: no API token: pass --token or set KERNEX_TOKEN/);
  });

  test('unknown device: exit 2, and where to look', async () => {
    const [get, deploy, bundle] = await Promise.all([
      ctl('devices', 'get', 'ghost'), ctl('deploy', '1.0.0', '-d', 'dev-a,ghost', '--wait'), ctl('deploy', '9.9.9', '-d', 'dev-a'),
    ]);
    expect(get.code).toBe(2);
    expect(get.stderr).toBe('kernexctl: device ghost not found: `kernexctl devices list` shows the registered devices\n');
    expect(deploy.code).toBe(2);
    expect(deploy.stderr).toBe('kernexctl: unknown device(s): ghost; `kernexctl devices list` shows the registered devices\n');
    expect(bundle.code).toBe(2);
    expect(bundle.stderr).toContain('bundle version 9.9.9 does not exist; `kernexctl bundles list`');
  });

  test('invalid manifest or missing script: exit 2, the reason, and nothing written', async () => {
    const bad = await bundleDir('x', join(work, 'none.out'), { manifest: { version: 'not-semver', deploy: {} } });
    const out = join(work, 'bad.tar.gz');
    const res = await ctl('bundles', 'pack', bad, '-o', out);
    expect(res.code).toBe(2);
    expect(res.stderr).toBe(`kernexctl: ${bad}/manifest.json is invalid: /version must match format "semver"; ` +
      '/deploy must have required property \'script\'; fix it and run again\n');
    expect(existsSync(out)).toBe(false);

    const noScript = await bundleDir('5.0.0', join(work, 'none.out'), { skipScript: true });
    const missing = await ctl('bundles', 'upload', noScript);
    expect(missing.code).toBe(2);
    expect(missing.stderr).toMatch(/^kernexctl: manifest\.json names deploy script 'bin\/deploy\.sh', but .* does not exist; add it or fix the path\n$/);
    expect(JSON.parse((await ctl('bundles', 'list', '--json')).stdout).map((b: { version: string }) => b.version)).not.toContain('5.0.0');

    const notJson = await mkdtemp(join(work, 'notjson-'));
    await writeFile(join(notJson, 'manifest.json'), '{ nope');
    const broken = await ctl('bundles', 'pack', notJson);
    expect(broken.code).toBe(2);
    expect(broken.stderr).toMatch(/manifest\.json is not valid JSON/);
  });

  test('usage errors: exit 2 with a pointer to --help', async () => {
    const [unknown, noTargets, missingArg, badSetting] = await Promise.all([
      ctl('devics'), ctl('deploy', '1.0.0', '--wait'), ctl('devices', 'get'), ctl('config', 'set', 'dev-a', 'polling_interval=soon'),
    ]);
    expect(unknown.code).toBe(2);
    expect(unknown.stderr).toContain('Did you mean devices?');
    expect(noTargets.code).toBe(2);
    expect(noTargets.stderr).toBe('kernexctl: name the target devices with --devices a,b,c (or --all)\n');
    expect(missingArg.code).toBe(2);
    expect(missingArg.stderr).toContain("Run 'kernexctl devices get --help' for usage.");
    expect(badSetting.code).toBe(2);
    expect(badSetting.stderr).toBe('kernexctl: invalid settings: polling_interval must be integer\n');
  });

  test('--wait gives up after --timeout with exit 5; the deployment goes on', async () => {
    const late = await agent('dev-late');
    await late.stop();
    await waitFor(async () => (await tc.api.get('/devices/dev-late')).body.status === 'offline', 'dev-late offline');
    const res = await ctl('deploy', '1.0.0', '-d', 'dev-late', '--wait', '--timeout', '1');
    expect(res.code).toBe(5);
    expect(res.stderr).toMatch(/^kernexctl: deployment ([0-9a-f-]{36}) is still running after 1 s \(0 of 1 devices finished\); follow it with: kernexctl deployments wait \1\n$/);
    expect(res.stdout).toMatch(/deploying 1\.0\.0 on 1 device\(s\)/);

    // Ctrl-C while waiting: the deployment goes on, and the way back to it is printed.
    const waiting = spawnKernexctl(['deploy', '1.0.0', '-d', 'dev-late', '--wait'], { env: local() });
    running.push(waiting);
    await waitFor(() => waiting.stdout().includes('deploying 1.0.0'), 'the wait to start');
    const code = await waiting.stop('SIGINT');
    expect({ code, signal: waiting.child.signalCode, stderr: waiting.stderr() }).toEqual({
      code: 130,
      signal: null,
      stderr: expect.stringMatching(/^kernexctl: stopped waiting; deployment (\S+) goes on\. Follow it again with: kernexctl deployments wait \1\n$/),
    });
  });

  test('MQTT broker unreachable: watch exits 3; --wait falls back to polling the REST API', async () => {
    const mqtt = `mqtt://127.0.0.1:${await freePort()}`;
    const watch = await ctl('watch', '--mqtt-url', mqtt);
    expect(watch.code).toBe(3);
    expect(watch.stderr).toMatch(new RegExp(`^kernexctl: cannot reach the MQTT broker at ${mqtt} \\(ECONNREFUSED\\): set --mqtt-url or KERNEX_MQTT_URL\n$`));

    const res = await ctl('deploy', '1.0.0', '-d', 'dev-a', '--wait', '--mqtt-url', mqtt);
    expect(res.code).toBe(0);
    expect(res.stderr).toMatch(/live events unavailable .*; following by polling the REST API every 1 s/);
    expect(res.stdout).toMatch(/dev-a  success/);
    expect(res.stdout).toContain('✔ deployment of 1.0.0 succeeded on 1/1 device(s)');
  });

  test('a token the broker refuses: watch exits 4', async () => {
    const res = await kernexctl(['watch'], {
      env: { KERNEX_SERVER: tc.controller.httpUrl, KERNEX_TOKEN: 'kxt_nope', KERNEX_MQTT_URL: tc.controller.mqttUrl },
    });
    expect(res.code).toBe(4);
    expect(res.stderr).toBe(`kernexctl: the MQTT broker at ${tc.controller.mqttUrl} refused the token from KERNEX_TOKEN; pass a valid one with --token\n`);
  });
});

describe('upload progress', () => {
  const withScript = hasProgram('script') ? test : test.skip;

  withScript('a progress bar on a terminal, none in a pipe', async () => {
    const big = async (version: string) => {
      const dir = await bundleDir(version, join(work, 'none.out'));
      // 2 MiB that gzip cannot shrink, so there is something to show.
      await writeFile(join(dir, 'payload/blob.bin'), randomBytes(2 * 1024 * 1024));
      const file = join(work, `big-${version}.tar.gz`);
      expect((await ctl('bundles', 'pack', dir, '-o', file)).code).toBe(0);
      return file;
    };
    const file = await big('6.0.0');

    // `script` gives kernexctl a pseudo-terminal, as a person's shell would.
    const command = `${process.execPath} ${KERNEXCTL_BIN} bundles upload ${file}`;
    const tty = await new Promise<string>((resolve, reject) =>
      execFile('script', ['-qec', command, '/dev/null'], { env: ctlEnv(local()) },
        (err, stdout) => (err ? reject(err) : resolve(stdout))));
    expect(tty).toMatch(/Uploading big-6\.0\.0\.tar\.gz \[#+\] 100% 2\.0 MiB\/2\.0 MiB/);
    expect(tty).toContain('Uploaded demo-app 6.0.0');

    const pipe = await ctl('bundles', 'upload', await big('6.0.1'));
    expect(pipe.code).toBe(0);
    expect(pipe.stderr).toBe('');
    expect(pipe.stdout).toMatch(/^Uploaded demo-app 6\.0\.1 as /);
  });
});
