// kernexctl's pure parts: where credentials come from, how settings are
// read, how output is laid out. The end-to-end suite covers the rest.
import { mkdtemp, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Writable } from 'node:stream';
import { resolveCredentials, DEFAULT_SERVER } from '../cli/ctl/credentials.js';
import { parseSettings } from '../cli/ctl/config.js';
import { Output, formatAge, formatBytes, formatDuration, progressBar } from '../cli/ctl/output.js';
import { splitList } from '../cli/ctl/command.js';
import { CtlError, EXIT } from '../cli/ctl/errors.js';

async function dataDir(creds: Record<string, unknown> | string | null) {
  const dir = await mkdtemp(join(tmpdir(), 'kernexctl-creds-'));
  if (creds !== null) await writeFile(join(dir, 'credentials.json'), typeof creds === 'string' ? creds : JSON.stringify(creds));
  return dir;
}

describe('credentials', () => {
  const file = { server: 'http://10.0.0.5:8000', mqtt: 'mqtt://10.0.0.5:1883', token: 'kxt_local', enrollment_token: 'kxe_x' };

  test('flags win over the environment, which wins over the file', async () => {
    const dir = await dataDir(file);
    const env = { KERNEX_SERVER: 'http://env:1', KERNEX_TOKEN: 'kxt_env', KERNEX_DATA_DIR: dir };
    expect(resolveCredentials({ server: 'http://flag:2/', token: 'kxt_flag' }, env)).toMatchObject({
      server: 'http://flag:2', token: 'kxt_flag', tokenSource: '--token', mqttUrl: undefined,
    });
    expect(resolveCredentials({}, env)).toMatchObject({ server: 'http://env:1', token: 'kxt_env', tokenSource: 'KERNEX_TOKEN' });
    expect(resolveCredentials({}, { KERNEX_DATA_DIR: dir })).toEqual({
      server: 'http://10.0.0.5:8000', token: 'kxt_local', tokenSource: join(dir, 'credentials.json'),
      mqttUrl: 'mqtt://10.0.0.5:1883', credentialsFile: join(dir, 'credentials.json'),
    });
  });

  test("the file's token goes only to the file's server", async () => {
    const dir = await dataDir(file);
    const elsewhere = resolveCredentials({ server: 'http://other:8000' }, { KERNEX_DATA_DIR: dir });
    expect(elsewhere).toMatchObject({ server: 'http://other:8000', token: undefined, tokenSource: 'none', mqttUrl: undefined });
    // The same server written differently still matches.
    expect(resolveCredentials({ server: 'http://10.0.0.5:8000/api/v1/' }, { KERNEX_DATA_DIR: dir }).token).toBe('kxt_local');
  });

  test('--data-dir over KERNEX_DATA_DIR; no file or a broken one: the default server, no token', async () => {
    const dir = await dataDir(file);
    expect(resolveCredentials({ dataDir: dir }, { KERNEX_DATA_DIR: '/nonexistent' }).token).toBe('kxt_local');
    for (const broken of [null, '{not json', '[1,2]', JSON.stringify({ server: 42, token: '' })]) {
      const d = await dataDir(broken);
      expect(resolveCredentials({}, { KERNEX_DATA_DIR: d })).toMatchObject({ server: DEFAULT_SERVER, token: undefined });
    }
  });
});

describe('config set settings', () => {
  test('key=value pairs become a valid update: numbers from strings, log level in any case, metadata as JSON', async () => {
    expect(await parseSettings(['polling_interval=120', 'log_level=debug', 'deploy-timeout=30', 'metadata_json={"site":"lab"}']))
      .toEqual({ polling_interval: 120, log_level: 'DEBUG', deploy_timeout: 30, metadata_json: { site: 'lab' } });
    expect(await parseSettings(['log_level=warn', 'metadata_json=null'])).toEqual({ log_level: 'WARNING', metadata_json: null });
  });

  test.each([
    [['polling_interval'], /is not key=value/],
    [['colour=blue'], /unknown setting 'colour'; settable: polling_interval/],
    [['polling_interval=0'], /polling_interval must be >= 1/],
    [['polling_interval=1.5'], /polling_interval must be integer/],
    [['log_level=LOUD'], /log_level must be one of/],
    [['metadata_json={oops'], /metadata_json must be a JSON object/],
    [['metadata_json=[1]'], /metadata_json must be object,null/],
  ])('%j is refused as a usage error', async (pairs, message) => {
    const err = await parseSettings(pairs).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(CtlError);
    expect((err as CtlError).exitCode).toBe(EXIT.usage);
    expect((err as CtlError).message).toMatch(message);
  });
});

describe('output', () => {
  const capture = (mode: 'human' | 'json' | 'quiet') => {
    let text = '';
    const stream = new Writable({ write: (c: Buffer, _e, cb) => ((text += c.toString()), cb()) }) as unknown as NodeJS.WriteStream;
    return { out: new Output(mode, stream, stream), text: () => text };
  };

  test('tables are aligned, control characters cannot reach the terminal, and only human mode prints them', () => {
    const rows = [{ id: 'dev-1', s: 'online' }, { id: 'a-much-longer-id', s: 'off\x1b[2Jline' }];
    const { out, text } = capture('human');
    out.table([{ header: 'DEVICE', value: (r) => r.id }, { header: 'STATUS', value: (r) => r.s }], rows);
    expect(text()).toBe(
      'DEVICE            STATUS\n' +
      'dev-1             online\n' +
      'a-much-longer-id  off [2Jline\n');
    const json = capture('json');
    json.out.table([{ header: 'X', value: () => 'x' }], [{}]);
    json.out.json({ a: 1 });
    expect(JSON.parse(json.text())).toEqual({ a: 1 });
    const quiet = capture('quiet');
    quiet.out.line('hello');
    quiet.out.id('dev-1');
    expect(quiet.text()).toBe('dev-1\n');
  });

  test('formatters', () => {
    expect(formatBytes(512)).toBe('512 B');
    expect(formatBytes(2 * 1024 * 1024)).toBe('2.0 MiB');
    expect(formatDuration(0.25)).toBe('250ms');
    expect(formatDuration('3.5')).toBe('3.5s');
    expect(formatDuration(125)).toBe('2m5s');
    expect(formatDuration(null)).toBe('-');
    expect(formatAge(new Date(Date.now() - 90_000).toISOString())).toBe('1m ago');
    expect(formatAge(null)).toBe('-');
    expect(progressBar(1, 4, 8)).toBe('[##------]  25%');
    expect(progressBar(0, 0, 4)).toBe('[####] 100%');
    expect(splitList(['a,b', 'c', 'a', ' d '])).toEqual(['a', 'b', 'c', 'd']);
  });
});
