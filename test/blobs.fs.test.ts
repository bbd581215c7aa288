import { mkdir, mkdtemp, readdir, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Readable } from 'node:stream';
import { BlobKeyError, BlobTooLargeError, openBlobStore } from '../controller/blobs/index.js';
import { createFsBlobStore } from '../controller/blobs/fs.js';
import { blobContract } from './blobs.contract.js';

const bytes = (n: number): Buffer => Buffer.alloc(n, 0x61);

let contractDir = '';
blobContract(
  'filesystem',
  async () => {
    contractDir = await mkdtemp(join(tmpdir(), 'kernex-blobs-'));
    return createFsBlobStore(contractDir);
  },
  () => rm(contractDir, { recursive: true, force: true }),
);

describe('filesystem blob store', () => {
  let root: string;
  beforeEach(async () => {
    root = await mkdtemp(join(tmpdir(), 'kernex-blobs-fs-'));
  });
  afterEach(() => rm(root, { recursive: true, force: true }));

  test('openBlobStore without s3 stores files under <dataDir>/blobs, named by key', async () => {
    const store = await openBlobStore({ dataDir: root });
    await store.put('bundle-1', Readable.from([bytes(10)]));
    expect(await readdir(join(root, 'blobs'))).toEqual(expect.arrayContaining(['bundle-1']));
    expect(await store.downloadUrl('bundle-1', 60)).toBeNull();
    await store.close();
  });

  test('keys that would escape the directory are refused and create nothing', async () => {
    const dir = join(root, 'store');
    const store = await createFsBlobStore(dir);
    for (const bad of ['../x', 'a/b', '../../etc/passwd', '/abs']) {
      await expect(store.put(bad, Readable.from([bytes(3)]))).rejects.toBeInstanceOf(BlobKeyError);
    }
    expect(await readdir(root)).toEqual(['store']);
    expect(await readdir(dir)).toEqual(['.tmp']);
    expect(await readdir(join(dir, '.tmp'))).toEqual([]);
  });

  test('a failed put leaves no temp file behind', async () => {
    const store = await createFsBlobStore(root);
    await expect(store.put('big', Readable.from([bytes(100), bytes(100)]), { maxBytes: 150 })).rejects.toBeInstanceOf(
      BlobTooLargeError,
    );
    async function* broken(): AsyncGenerator<Buffer> {
      yield bytes(1000);
      throw new Error('link lost');
    }
    await expect(store.put('broken', Readable.from(broken()))).rejects.toThrow('link lost');
    expect(await readdir(join(root, '.tmp'))).toEqual([]);
    expect(await readdir(root)).toEqual(['.tmp']);
  });

  test('stale temp files from a crash are removed when the store opens', async () => {
    await mkdir(join(root, '.tmp'));
    await writeFile(join(root, '.tmp', 'half-written'), bytes(10));
    await writeFile(join(root, 'kept'), bytes(5));
    const store = await createFsBlobStore(root);
    expect(await readdir(join(root, '.tmp'))).toEqual([]);
    expect(await store.stat('kept')).toEqual({ size: 5 });
  });
});
