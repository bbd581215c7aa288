// The agent's bundle handling against real sockets, real archives and real
// processes. Hostile archives are hand-built with tar's Header class, because
// tar.c itself refuses to produce most of them.
import { createHash, randomBytes } from 'node:crypto';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import fs from 'node:fs/promises';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import zlib from 'node:zlib';
import * as tar from 'tar';
import {
  downloadBundle, sha256File, DownloadError, BundleVerificationError,
  extractBundle, UnsafeBundleError, BundleFormatError, runScript, OUTPUT_TAIL_BYTES,
} from '../agent/bundle/index.js';

const TOKEN = 'device-token-123';
let tmp: string;

beforeEach(async () => {
  tmp = await fs.mkdtemp(path.join(os.tmpdir(), 'kernex-agent-bundle-test-'));
});
afterEach(async () => {
  await fs.rm(tmp, { recursive: true, force: true });
});

const sha256 = (data: Buffer): string => createHash('sha256').update(data).digest('hex');

// ---------------------------------------------------------------- servers

interface Seen {
  url: string;
  headers: http.IncomingHttpHeaders;
}
interface TestServer {
  base: string;
  seen: Seen[];
  close(): Promise<void>;
}
type Handler = (req: http.IncomingMessage, res: http.ServerResponse, n: number) => void;

const servers: TestServer[] = [];
afterEach(async () => {
  await Promise.all(servers.splice(0).map((s) => s.close()));
});

async function serve(handler: Handler): Promise<TestServer> {
  const seen: Seen[] = [];
  const server = http.createServer((req, res) => {
    seen.push({ url: req.url ?? '', headers: req.headers });
    handler(req, res, seen.length);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as AddressInfo;
  const s: TestServer = {
    base: `http://127.0.0.1:${port}`,
    seen,
    close: () => new Promise<void>((resolve) => {
      server.closeAllConnections();
      server.close(() => resolve());
    }),
  };
  servers.push(s);
  return s;
}

/** Serves `data`, honouring `Range: bytes=N-`. */
function sendBytes(req: http.IncomingMessage, res: http.ServerResponse, data: Buffer): void {
  const range = /^bytes=(\d+)-$/.exec(req.headers.range ?? '');
  if (range) {
    const start = Number(range[1]);
    if (start >= data.length) {
      res.writeHead(416, { 'content-range': `bytes */${data.length}` });
      res.end();
      return;
    }
    res.writeHead(206, {
      'content-length': data.length - start,
      'content-range': `bytes ${start}-${data.length - 1}/${data.length}`,
    });
    res.end(data.subarray(start));
    return;
  }
  res.writeHead(200, { 'content-length': data.length });
  res.end(data);
}

function authorized(req: http.IncomingMessage, res: http.ServerResponse): boolean {
  if (req.headers.authorization === `Bearer ${TOKEN}`) return true;
  res.writeHead(401, { 'content-type': 'application/json' });
  res.end(JSON.stringify({ error: 'unauthorized', message: 'device token required' }));
  return false;
}

// ---------------------------------------------------------------- download

describe('downloadBundle', () => {
  const payload = randomBytes(256 * 1024);
  const digest = sha256(payload);

  test('sends the device token, verifies and renames; 401 without the token is not retried', async () => {
    const controller = await serve((req, res) => {
      if (authorized(req, res)) sendBytes(req, res, payload);
    });
    const anonymous = await fetch(`${controller.base}/api/v1/bundles/b1/download`);
    expect(anonymous.status).toBe(401);
    await anonymous.body?.cancel();

    const dest = path.join(tmp, 'bundles', '1.0.0', 'bundle.tar.gz'); // directory created on demand
    const progress: number[] = [];
    await downloadBundle({
      url: `${controller.base}/api/v1/bundles/b1/download`, token: TOKEN, dest, size: payload.length, sha256: digest,
      onProgress: (n) => progress.push(n),
    });
    expect(readFileSync(dest).equals(payload)).toBe(true);
    expect(existsSync(`${dest}.part`)).toBe(false);
    expect(progress.at(-1)).toBe(payload.length);
    expect(await sha256File(dest)).toBe(digest);

    const before = controller.seen.length;
    const err = await downloadBundle({
      url: `${controller.base}/api/v1/bundles/b1/download`, token: 'wrong', dest: path.join(tmp, 'other'),
      size: payload.length, sha256: digest, backoffMs: 1,
    }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(DownloadError);
    expect((err as DownloadError).status).toBe(401);
    expect(controller.seen.length - before).toBe(1);
  });

  test('follows a redirect to another origin without the Authorization header', async () => {
    const storage = await serve((req, res) => sendBytes(req, res, payload));
    const controller = await serve((req, res) => {
      if (!authorized(req, res)) return;
      res.writeHead(302, { location: `${storage.base}/bucket/b1?X-Amz-Signature=abc` });
      res.end();
    });
    const dest = path.join(tmp, 'b1.tar.gz');
    await downloadBundle({ url: `${controller.base}/api/v1/bundles/b1/download`, token: TOKEN, dest, size: payload.length, sha256: digest });
    expect(readFileSync(dest).equals(payload)).toBe(true);
    expect(controller.seen[0].headers.authorization).toBe(`Bearer ${TOKEN}`);
    expect(storage.seen).toHaveLength(1);
    expect(storage.seen[0].url).toBe('/bucket/b1?X-Amz-Signature=abc');
    expect(storage.seen[0].headers.authorization).toBeUndefined();
  });

  test('a connection cut halfway is resumed with Range', async () => {
    const half = payload.length / 2;
    const controller = await serve((req, res, n) => {
      if (!authorized(req, res)) return;
      if (n === 1) {
        res.writeHead(200, { 'content-length': payload.length });
        res.write(payload.subarray(0, half), () => setTimeout(() => req.socket.destroy(), 20));
        return;
      }
      sendBytes(req, res, payload);
    });
    const dest = path.join(tmp, 'b1.tar.gz');
    await downloadBundle({ url: `${controller.base}/b`, token: TOKEN, dest, size: payload.length, sha256: digest, backoffMs: 10 });
    expect(readFileSync(dest).equals(payload)).toBe(true);
    expect(controller.seen).toHaveLength(2);
    expect(controller.seen[0].headers.range).toBeUndefined();
    expect(controller.seen[1].headers.range).toBe(`bytes=${half}-`);
    expect(controller.seen[1].headers.authorization).toBe(`Bearer ${TOKEN}`);
  });

  test('a server ignoring Range (200) makes the download start over', async () => {
    const controller = await serve((req, res) => {
      if (!authorized(req, res)) return;
      res.writeHead(200, { 'content-length': payload.length });
      res.end(payload);
    });
    const dest = path.join(tmp, 'b1.tar.gz');
    await fs.writeFile(`${dest}.part`, Buffer.from('stale bytes from something else'));
    await downloadBundle({ url: `${controller.base}/b`, token: TOKEN, dest, size: payload.length, sha256: digest });
    expect(controller.seen[0].headers.range).toBe('bytes=31-');
    expect(readFileSync(dest).equals(payload)).toBe(true);
  });

  test('416 on resume drops the stale .part and starts over', async () => {
    const controller = await serve((req, res) => {
      if (!authorized(req, res)) return;
      if (req.headers.range) {
        // The .part does not belong to this file (say, the blob was re-uploaded).
        res.writeHead(416, { 'content-range': `bytes */${payload.length}` });
        res.end();
        return;
      }
      sendBytes(req, res, payload);
    });
    const dest = path.join(tmp, 'b1.tar.gz');
    await fs.writeFile(`${dest}.part`, Buffer.alloc(500));
    await downloadBundle({ url: `${controller.base}/b`, token: TOKEN, dest, size: payload.length, sha256: digest, backoffMs: 1 });
    expect(controller.seen.map((s) => s.headers.range)).toEqual(['bytes=500-', undefined]);
    expect(readFileSync(dest).equals(payload)).toBe(true);
  });

  test('5xx is retried with backoff, 404 is not', async () => {
    const flaky = await serve((req, res, n) => {
      if (!authorized(req, res)) return;
      if (n <= 2) {
        res.writeHead(503);
        res.end();
        return;
      }
      sendBytes(req, res, payload);
    });
    const dest = path.join(tmp, 'b1.tar.gz');
    await downloadBundle({ url: `${flaky.base}/b`, token: TOKEN, dest, size: payload.length, sha256: digest, backoffMs: 5 });
    expect(flaky.seen).toHaveLength(3);

    const missing = await serve((_req, res) => {
      res.writeHead(404);
      res.end();
    });
    const err = await downloadBundle({ url: `${missing.base}/b`, token: TOKEN, dest: path.join(tmp, 'x'), size: 1, sha256: digest, backoffMs: 1 })
      .catch((e: unknown) => e);
    expect(err).toBeInstanceOf(DownloadError);
    expect((err as DownloadError).status).toBe(404);
    expect(missing.seen).toHaveLength(1);
  });

  test('gives up after the retry budget on a dead server', async () => {
    const dead = await serve((req) => req.socket.destroy());
    const err = await downloadBundle({ url: `${dead.base}/b`, token: TOKEN, dest: path.join(tmp, 'x'), size: 10, sha256: digest, retries: 2, backoffMs: 1 })
      .catch((e: unknown) => e);
    expect(err).toBeInstanceOf(DownloadError);
    expect((err as Error).message).toMatch(/after 3 attempts/);
    expect(dead.seen).toHaveLength(3);
  });

  test('sha256 mismatch throws BundleVerificationError and leaves no file', async () => {
    const controller = await serve((req, res) => {
      if (authorized(req, res)) sendBytes(req, res, payload);
    });
    const dest = path.join(tmp, 'b1.tar.gz');
    const wrong = sha256(Buffer.from('something else'));
    const err = await downloadBundle({ url: `${controller.base}/b`, token: TOKEN, dest, size: payload.length, sha256: wrong })
      .catch((e: unknown) => e);
    expect(err).toBeInstanceOf(BundleVerificationError);
    expect((err as Error).message).toContain(wrong);
    expect((err as Error).message).toContain(digest);
    expect(existsSync(dest)).toBe(false);
    expect(existsSync(`${dest}.part`)).toBe(false);
  });

  test('a body longer than announced is refused', async () => {
    const controller = await serve((req, res) => {
      if (authorized(req, res)) sendBytes(req, res, payload);
    });
    const dest = path.join(tmp, 'b1.tar.gz');
    const err = await downloadBundle({ url: `${controller.base}/b`, token: TOKEN, dest, size: 1000, sha256: digest })
      .catch((e: unknown) => e);
    expect(err).toBeInstanceOf(BundleVerificationError);
    expect(existsSync(`${dest}.part`)).toBe(false);
  });

  test('abort keeps the partial file for a later resume', async () => {
    const controller = await serve((req, res) => {
      if (!authorized(req, res)) return;
      res.writeHead(200, { 'content-length': payload.length });
      res.write(payload.subarray(0, 1000)); // then stall
    });
    const dest = path.join(tmp, 'b1.tar.gz');
    const ac = new AbortController();
    const p = downloadBundle({
      url: `${controller.base}/b`, token: TOKEN, dest, size: payload.length, sha256: digest, signal: ac.signal,
      onProgress: () => ac.abort(),
    });
    await expect(p).rejects.toMatchObject({ name: 'AbortError' });
    expect((await fs.stat(`${dest}.part`)).size).toBe(1000);
  });
});

// ---------------------------------------------------------------- archives

interface RawEntry {
  path: string;
  type?: 'File' | 'Directory' | 'SymbolicLink' | 'Link' | 'CharacterDevice' | 'BlockDevice' | 'FIFO';
  body?: string | Buffer;
  linkpath?: string;
  mode?: number;
  uid?: number;
}

/** A tar stream written header by header: whatever we ask for, hostile or not. */
function rawTar(entries: RawEntry[]): Buffer {
  const blocks: Buffer[] = [];
  for (const e of entries) {
    const body = typeof e.body === 'string' ? Buffer.from(e.body) : e.body ?? Buffer.alloc(0);
    const header = new tar.Header({
      path: e.path, type: e.type ?? 'File', size: body.length, linkpath: e.linkpath,
      mode: e.mode ?? (e.type === 'Directory' ? 0o755 : 0o644), uid: e.uid ?? 0, gid: e.uid ?? 0, mtime: new Date(0),
    });
    const block = Buffer.alloc(512);
    header.encode(block, 0);
    blocks.push(block);
    if (body.length > 0) blocks.push(body, Buffer.alloc((512 - (body.length % 512)) % 512));
  }
  blocks.push(Buffer.alloc(1024));
  return Buffer.concat(blocks);
}

const goodManifest = { version: '1.2.3', name: 'demo', deploy: { script: 'deploy.sh' }, rollback: { script: 'rollback.sh' } };
const manifestEntry = (m: unknown = goodManifest): RawEntry => ({ path: 'manifest.json', body: JSON.stringify(m) });
const deployEntry: RawEntry = { path: 'deploy.sh', body: '#!/bin/sh\necho deployed > deployed.txt\n', mode: 0o755 };
const rollbackEntry: RawEntry = { path: 'rollback.sh', body: '#!/bin/sh\necho rolled back\n', mode: 0o755 };

async function writeRaw(entries: RawEntry[], name = 'bundle.tar.gz'): Promise<string> {
  const file = path.join(tmp, 'in', name);
  await fs.mkdir(path.dirname(file), { recursive: true });
  await fs.writeFile(file, zlib.gzipSync(rawTar(entries)));
  return file;
}

/** A real bundle made by tar.c from files on disk. */
async function buildBundle(files: Record<string, string | Buffer>, modes: Record<string, number> = {}): Promise<string> {
  const src = path.join(tmp, 'src');
  for (const [name, content] of Object.entries(files)) {
    const full = path.join(src, name);
    await fs.mkdir(path.dirname(full), { recursive: true });
    await fs.writeFile(full, content);
    await fs.chmod(full, modes[name] ?? (name.endsWith('.sh') ? 0o755 : 0o644));
  }
  const file = path.join(tmp, 'in', 'bundle.tar.gz');
  await fs.mkdir(path.dirname(file), { recursive: true });
  await tar.c({ gzip: true, file, cwd: src, portable: true }, Object.keys(files));
  return file;
}

const goodFiles = (): Record<string, string> => ({
  'manifest.json': JSON.stringify(goodManifest),
  'deploy.sh': '#!/bin/sh\necho deploying\necho deployed > deployed.txt\n',
  'rollback.sh': '#!/bin/sh\necho rolled back\n',
  'payload/model.bin': 'weights',
});

/** The directory the bundle is extracted into, and what a refused bundle must leave there. */
const outDir = (): string => path.join(tmp, 'out');
const target = (): string => path.join(outDir(), 'current');
const leftovers = (): string[] => (existsSync(outDir()) ? readdirSync(outDir()) : []);

async function expectRefused(archive: string, kind: typeof UnsafeBundleError | typeof BundleFormatError, message: RegExp, limits?: { maxBytes?: number; maxEntries?: number }): Promise<void> {
  const err = await extractBundle(archive, target(), limits).catch((e: unknown) => e);
  expect(err).toBeInstanceOf(kind);
  expect((err as Error).message).toMatch(message);
  expect(leftovers()).toEqual([]);
}

describe('extractBundle', () => {
  test('extracts a good bundle, returns its manifest and replaces the old directory', async () => {
    await fs.mkdir(target(), { recursive: true });
    await fs.writeFile(path.join(target(), 'stale.txt'), 'old version');
    const archive = await buildBundle(goodFiles());

    const manifest = await extractBundle(archive, target());
    expect(manifest).toEqual(goodManifest);
    expect(readFileSync(path.join(target(), 'payload/model.bin'), 'utf8')).toBe('weights');
    expect(existsSync(path.join(target(), 'stale.txt'))).toBe(false);
    expect(leftovers()).toEqual(['current']);

    const result = await runScript({ bundleDir: target(), script: manifest.deploy.script, timeoutSeconds: 10 });
    expect(result.exit_code).toBe(0);
    expect(readFileSync(path.join(target(), 'deployed.txt'), 'utf8')).toBe('deployed\n');
  });

  test('accepts ./-prefixed entries and symlinks that stay inside', async () => {
    const archive = await writeRaw([
      { path: './', type: 'Directory' },
      { path: './manifest.json', body: JSON.stringify({ version: '2.0.0', deploy: { script: 'deploy.sh' } }) },
      { path: './scripts/', type: 'Directory' },
      { path: './scripts/real-deploy.sh', body: '#!/bin/sh\nexit 0\n', mode: 0o755 },
      { path: './deploy.sh', type: 'SymbolicLink', linkpath: 'scripts/real-deploy.sh' },
      { path: './scripts/up', type: 'SymbolicLink', linkpath: '../scripts' },
    ]);
    const manifest = await extractBundle(archive, target());
    expect(manifest.version).toBe('2.0.0');
    expect((await fs.lstat(path.join(target(), 'deploy.sh'))).isSymbolicLink()).toBe(true);
  });

  test('strips setuid/setgid and group/world write, and ignores archive ownership', async () => {
    const archive = await writeRaw([
      manifestEntry({ version: '1.0.0', deploy: { script: 'deploy.sh' } }),
      { ...deployEntry, mode: 0o6777, uid: 4242 },
      { path: 'bin/', type: 'Directory', mode: 0o7777 },
    ]);
    await extractBundle(archive, target());
    const st = await fs.stat(path.join(target(), 'deploy.sh'));
    expect(st.mode & 0o7022).toBe(0);
    expect(st.mode & 0o100).toBe(0o100);
    expect(st.uid).toBe(process.getuid?.());
    expect((await fs.stat(path.join(target(), 'bin'))).mode & 0o7022).toBe(0);
  });

  test('a refused bundle leaves the installed one untouched', async () => {
    await fs.mkdir(target(), { recursive: true });
    await fs.writeFile(path.join(target(), 'installed.txt'), 'v1');
    const archive = await writeRaw([manifestEntry(), deployEntry, { path: '../x', body: 'pwned' }]);
    await expect(extractBundle(archive, target())).rejects.toBeInstanceOf(UnsafeBundleError);
    expect(readFileSync(path.join(target(), 'installed.txt'), 'utf8')).toBe('v1');
    expect(leftovers()).toEqual(['current']);
  });

  describe('refuses hostile archives, leaving nothing behind', () => {
    test("entry '../x'", async () => {
      const archive = await writeRaw([manifestEntry(), deployEntry, rollbackEntry, { path: '../x', body: 'pwned' }]);
      await expectRefused(archive, UnsafeBundleError, /"\.\.\/x".*'\.\.'/);
      expect(existsSync(path.join(outDir(), 'x'))).toBe(false);
      expect(existsSync(path.join(tmp, 'x'))).toBe(false);
    });

    test('entry with a .. segment in the middle', async () => {
      const archive = await writeRaw([manifestEntry(), deployEntry, { path: 'a/../../y', body: 'pwned' }]);
      await expectRefused(archive, UnsafeBundleError, /a\/\.\.\/\.\.\/y/);
      expect(existsSync(path.join(outDir(), 'y'))).toBe(false);
    });

    test('absolute path entry', async () => {
      const outside = path.join('/tmp', `kernex-abs-${randomBytes(6).toString('hex')}`);
      const archive = await writeRaw([manifestEntry(), deployEntry, { path: `${outside}/x`, body: 'pwned' }]);
      await expectRefused(archive, UnsafeBundleError, new RegExp(`${outside}/x.*absolute`));
      expect(existsSync(outside)).toBe(false);
    });

    test('symlink to / followed by a file written through it', async () => {
      const name = `kernex-through-${randomBytes(6).toString('hex')}`;
      const archive = await writeRaw([
        manifestEntry(), deployEntry,
        { path: 'link', type: 'SymbolicLink', linkpath: '/' },
        { path: `link/tmp/${name}`, body: 'pwned' },
      ]);
      await expectRefused(archive, UnsafeBundleError, /"link"/);
      expect(existsSync(path.join('/tmp', name))).toBe(false);
    });

    test('file written through a symlink that itself stays inside', async () => {
      const archive = await writeRaw([
        manifestEntry(), deployEntry,
        { path: 'sub/', type: 'Directory' },
        { path: 'inner', type: 'SymbolicLink', linkpath: 'sub' },
        { path: 'inner/x', body: 'sneaky' },
      ]);
      await expectRefused(archive, UnsafeBundleError, /"inner\/x".*through the symlink "inner"/);
    });

    test('symlink escaping with a relative target', async () => {
      const archive = await writeRaw([
        manifestEntry(), deployEntry,
        { path: 'a/', type: 'Directory' },
        { path: 'a/esc', type: 'SymbolicLink', linkpath: '../../..' },
      ]);
      await expectRefused(archive, UnsafeBundleError, /"a\/esc".*outside the bundle/);
    });

    test('symlink chain that only escapes when resolved for real', async () => {
      // Lexically a/b/esc -> up/.. is a/b; but up is a link to the root, so it is the root's parent.
      const archive = await writeRaw([
        manifestEntry(), deployEntry, rollbackEntry,
        { path: 'a/', type: 'Directory' },
        { path: 'a/b/', type: 'Directory' },
        { path: 'a/b/up', type: 'SymbolicLink', linkpath: '../..' },
        { path: 'a/b/esc', type: 'SymbolicLink', linkpath: 'up/..' },
      ]);
      await expectRefused(archive, UnsafeBundleError, /a\/b\/esc.*outside the bundle/);
    });

    test('hardlink to /etc/passwd', async () => {
      const archive = await writeRaw([manifestEntry(), deployEntry, { path: 'passwd', type: 'Link', linkpath: '/etc/passwd' }]);
      await expectRefused(archive, UnsafeBundleError, /"passwd".*hardlink/);
    });

    test('hardlink inside the bundle (all hardlinks are refused)', async () => {
      const archive = await writeRaw([manifestEntry(), deployEntry, rollbackEntry, { path: 'copy.sh', type: 'Link', linkpath: 'deploy.sh' }]);
      await expectRefused(archive, UnsafeBundleError, /"copy\.sh".*hardlink/);
    });

    test('deploy.script is a symlink pointing outside', async () => {
      const absolute = await writeRaw([manifestEntry(), rollbackEntry, { path: 'deploy.sh', type: 'SymbolicLink', linkpath: '/etc/passwd' }]);
      await expectRefused(absolute, UnsafeBundleError, /"deploy\.sh".*absolute target/);
      const relative = await writeRaw([manifestEntry(), rollbackEntry, { path: 'deploy.sh', type: 'SymbolicLink', linkpath: '../../../../../etc/passwd' }], 'rel.tar.gz');
      await expectRefused(relative, UnsafeBundleError, /"deploy\.sh".*outside the bundle/);
    });

    test('character device, block device and FIFO entries', async () => {
      for (const type of ['CharacterDevice', 'BlockDevice', 'FIFO'] as const) {
        const archive = await writeRaw([manifestEntry(), deployEntry, { path: 'dev', type }], `${type}.tar.gz`);
        await expectRefused(archive, UnsafeBundleError, type === 'FIFO' ? /"dev".*FIFO/ : /"dev".*device/);
      }
    });

    test('unpacked size over the limit (5 MiB of zeros, limit 1 MiB)', async () => {
      const archive = await buildBundle({ ...goodFiles(), 'zeros.bin': Buffer.alloc(5 * 1024 * 1024) });
      expect((await fs.stat(archive)).size).toBeLessThan(64 * 1024);
      await expectRefused(archive, UnsafeBundleError, /more than 1048576 bytes.*zeros\.bin/, { maxBytes: 1024 * 1024 });
    });

    test('gzip bomb: a single 600 MiB entry against the default 512 MiB limit', async () => {
      const size = 600 * 1024 * 1024;
      async function* bomb(): AsyncGenerator<Buffer> {
        yield rawTar([manifestEntry(), deployEntry]).subarray(0, -1024);
        const header = Buffer.alloc(512);
        new tar.Header({ path: 'zeros.bin', type: 'File', size, mode: 0o644, mtime: new Date(0) }).encode(header, 0);
        yield header;
        const chunk = Buffer.alloc(1024 * 1024);
        for (let i = 0; i < size / chunk.length; i++) yield chunk;
        yield Buffer.alloc(1024);
      }
      const archive = path.join(tmp, 'in', 'bomb.tar.gz');
      await fs.mkdir(path.dirname(archive), { recursive: true });
      await pipeline(Readable.from(bomb()), zlib.createGzip({ level: 1 }), (await fs.open(archive, 'w')).createWriteStream());
      const started = Date.now();
      await expectRefused(archive, UnsafeBundleError, /more than 536870912 bytes.*zeros\.bin/);
      expect(Date.now() - started).toBeLessThan(5000); // stopped at the header, not after inflating
    });

    test('decompressed stream larger than the entries explain (trailing zeros)', async () => {
      const tarball = Buffer.concat([rawTar([manifestEntry(), deployEntry, rollbackEntry]), Buffer.alloc(8 * 1024 * 1024)]);
      const archive = path.join(tmp, 'in', 'padded.tar.gz');
      await fs.mkdir(path.dirname(archive), { recursive: true });
      await fs.writeFile(archive, zlib.gzipSync(tarball));
      await expectRefused(archive, UnsafeBundleError, /decompresses to more than/, { maxBytes: 1024 * 1024, maxEntries: 10 });
    });

    test('too many entries', async () => {
      const files: Record<string, string> = goodFiles();
      for (let i = 0; i < 20; i++) files[`data/f${i}.txt`] = String(i);
      const archive = await buildBundle(files);
      await expectRefused(archive, UnsafeBundleError, /more than 10 entries/, { maxEntries: 10 });
    });

    test('non-gzip garbage and an uncompressed tar', async () => {
      const garbage = path.join(tmp, 'in', 'garbage.tar.gz');
      await fs.mkdir(path.dirname(garbage), { recursive: true });
      await fs.writeFile(garbage, randomBytes(4096));
      await expectRefused(garbage, BundleFormatError, /not a gzip-compressed tar archive/);

      const plain = path.join(tmp, 'in', 'plain.tar.gz');
      await fs.writeFile(plain, rawTar([manifestEntry(), deployEntry]));
      await expectRefused(plain, BundleFormatError, /not a gzip-compressed tar archive/);

      const empty = path.join(tmp, 'in', 'empty.tar.gz');
      await fs.writeFile(empty, '');
      await expectRefused(empty, BundleFormatError, /not a gzip/);
    });

    test('gzip of something that is not a tar', async () => {
      const archive = path.join(tmp, 'in', 'notar.tar.gz');
      await fs.mkdir(path.dirname(archive), { recursive: true });
      await fs.writeFile(archive, zlib.gzipSync(randomBytes(10_000)));
      await expectRefused(archive, BundleFormatError, /corrupt tar archive/);
    });

    test('truncated archive', async () => {
      const archive = await buildBundle({ ...goodFiles(), 'payload/random.bin': randomBytes(200_000) });
      const bytes = readFileSync(archive);
      await fs.writeFile(archive, bytes.subarray(0, Math.floor(bytes.length * 0.6)));
      await expectRefused(archive, BundleFormatError, /truncated|unexpected end/i);
    });

    test('truncated tar inside a complete gzip stream', async () => {
      const whole = rawTar([manifestEntry(), deployEntry, rollbackEntry, { path: 'big.bin', body: randomBytes(100_000) }]);
      const archive = path.join(tmp, 'in', 'cut.tar.gz');
      await fs.mkdir(path.dirname(archive), { recursive: true });
      await fs.writeFile(archive, zlib.gzipSync(whole.subarray(0, 60_000)));
      await expectRefused(archive, BundleFormatError, /corrupt tar archive/);
    });

    test('missing manifest', async () => {
      const files = goodFiles();
      delete files['manifest.json'];
      await expectRefused(await buildBundle(files), BundleFormatError, /manifest\.json is missing/);
    });

    test('manifest that is not JSON', async () => {
      await expectRefused(await buildBundle({ ...goodFiles(), 'manifest.json': '{ nope' }), BundleFormatError, /manifest\.json is not valid JSON/);
    });

    test('manifest with a bad semver', async () => {
      const files = { ...goodFiles(), 'manifest.json': JSON.stringify({ ...goodManifest, version: '1.2' }) };
      await expectRefused(await buildBundle(files), BundleFormatError, /manifest\.json is invalid: \/version/);
    });

    test('deploy script missing from the archive', async () => {
      const files = goodFiles();
      delete files['deploy.sh'];
      await expectRefused(await buildBundle(files), BundleFormatError, /deploy\.script 'deploy\.sh' not found/);
    });

    test('rollback script missing from the archive', async () => {
      const files = goodFiles();
      delete files['rollback.sh'];
      await expectRefused(await buildBundle(files), BundleFormatError, /rollback\.script 'rollback\.sh' not found/);
    });
  });
});

// ---------------------------------------------------------------- scripts

/** Processes of the group that are still running (zombies waiting for a reaper do not count). */
function liveGroupMembers(pgid: number): number[] {
  const live: number[] = [];
  for (const name of readdirSync('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    let stat: string;
    try {
      stat = readFileSync(`/proc/${name}/stat`, 'utf8');
    } catch {
      continue;
    }
    // pid (comm) state ppid pgrp ...: comm may contain spaces, so parse after the last ')'.
    const [state, , pgrp] = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    if (Number(pgrp) === pgid && state !== 'Z') live.push(Number(name));
  }
  return live;
}

describe('runScript', () => {
  async function bundleWith(script: string, mode = 0o755): Promise<string> {
    const dir = path.join(tmp, 'bundle');
    await fs.mkdir(dir, { recursive: true });
    await fs.writeFile(path.join(dir, 'run.sh'), script);
    await fs.chmod(path.join(dir, 'run.sh'), mode);
    return dir;
  }

  test('exit 0: output captured, cwd is the bundle, env passed', async () => {
    const dir = await bundleWith('#!/bin/sh\necho "hello from $(pwd) $KERNEX_VERSION"\n');
    const chunks: string[] = [];
    const r = await runScript({ bundleDir: dir, script: 'run.sh', timeoutSeconds: 10, env: { KERNEX_VERSION: '1.2.3' }, onOutput: (c) => chunks.push(c) });
    expect(r).toMatchObject({ exit_code: 0, timed_out: false, signal: null });
    expect(r.output_tail).toBe(`hello from ${await fs.realpath(dir)} 1.2.3\n`);
    expect(chunks.join('')).toBe(r.output_tail);
    expect(r.duration_seconds).toBeGreaterThanOrEqual(0);
  });

  test('a script without the executable bit runs with /bin/sh', async () => {
    const dir = await bundleWith('echo via sh\n', 0o644);
    const r = await runScript({ bundleDir: dir, script: 'run.sh', timeoutSeconds: 10 });
    expect(r.exit_code).toBe(0);
    expect(r.output_tail).toBe('via sh\n');
  });

  test('exit 1: stderr in the tail, interleaved with stdout', async () => {
    const dir = await bundleWith('#!/bin/sh\necho starting\nsleep 0.1\necho "oops: disk full" >&2\nexit 1\n');
    const r = await runScript({ bundleDir: dir, script: 'run.sh', timeoutSeconds: 10 });
    expect(r.exit_code).toBe(1);
    expect(r.timed_out).toBe(false);
    expect(r.output_tail).toBe('starting\noops: disk full\n');
  });

  test('timeout kills the whole process group, background children included', async () => {
    const dir = await bundleWith('#!/bin/sh\necho $$ > pids\nsleep 300 &\necho $! >> pids\necho started\nsleep 300\n');
    const started = Date.now();
    const r = await runScript({ bundleDir: dir, script: 'run.sh', timeoutSeconds: 1 });
    expect(Date.now() - started).toBeLessThan(5000);
    expect(r).toMatchObject({ timed_out: true, exit_code: null, signal: 'SIGTERM' });
    expect(r.output_tail).toBe('started\n');
    const [leader, background] = readFileSync(path.join(dir, 'pids'), 'utf8').trim().split('\n').map(Number);
    expect(background).toBeGreaterThan(0);
    expect(liveGroupMembers(leader)).toEqual([]);
    expect(liveGroupMembers(background)).toEqual([]);
  });

  test('a group that ignores SIGTERM gets SIGKILL after the grace period', async () => {
    const dir = await bundleWith("#!/bin/sh\ntrap '' TERM\necho $$ > pids\nsleep 300 &\nsleep 300\n");
    const r = await runScript({ bundleDir: dir, script: 'run.sh', timeoutSeconds: 1 });
    expect(r).toMatchObject({ timed_out: true, exit_code: null, signal: 'SIGKILL' });
    const leader = Number(readFileSync(path.join(dir, 'pids'), 'utf8').trim());
    expect(liveGroupMembers(leader)).toEqual([]);
  });

  test('output tail keeps the last 4 KiB, cut on a character boundary', async () => {
    // 6001 bytes: the last 4096 start on the second byte of an 'é'.
    const dir = await bundleWith(`#!/bin/sh\nhead -c 20000 /dev/zero | tr '\\0' a\nprintf '${'é'.repeat(3000)}E'\n`);
    const r = await runScript({ bundleDir: dir, script: 'run.sh', timeoutSeconds: 10 });
    expect(r.exit_code).toBe(0);
    expect(Buffer.byteLength(r.output_tail)).toBeLessThanOrEqual(OUTPUT_TAIL_BYTES);
    expect(Buffer.byteLength(r.output_tail)).toBeGreaterThanOrEqual(OUTPUT_TAIL_BYTES - 3);
    expect(r.output_tail).not.toContain('\uFFFD');
    expect(r.output_tail).not.toContain('a');
    expect(r.output_tail.endsWith('éééE')).toBe(true);
  });

  test('refuses scripts outside the bundle and reports missing ones', async () => {
    const dir = await bundleWith('#!/bin/sh\nexit 0\n');
    await expect(runScript({ bundleDir: dir, script: '../run.sh', timeoutSeconds: 1 })).rejects.toBeInstanceOf(UnsafeBundleError);
    await expect(runScript({ bundleDir: dir, script: '/bin/true', timeoutSeconds: 1 })).rejects.toBeInstanceOf(UnsafeBundleError);
    await fs.symlink('/bin/true', path.join(dir, 'escape.sh'));
    await expect(runScript({ bundleDir: dir, script: 'escape.sh', timeoutSeconds: 1 })).rejects.toBeInstanceOf(UnsafeBundleError);
    await expect(runScript({ bundleDir: dir, script: 'nope.sh', timeoutSeconds: 1 })).rejects.toBeInstanceOf(BundleFormatError);
  });
});
