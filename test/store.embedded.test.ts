// The embedded (NeDB) backend: the contract on real files and in memory, plus
// what only a file-backed store can get wrong: unusable directories and
// datafiles, background compaction, openStore's layout.

import { cp, mkdir, mkdtemp, readdir, readFile, rename, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import {
  StoreUnavailableError,
  createNedbStore,
  openStore,
  type Store,
  type StoredDocument,
} from '../controller/store/index.js';
import { storeContract } from './store.contract.js';

interface Doc extends StoredDocument {
  [field: string]: unknown;
}

const tempDirs: string[] = [];
async function tempDir(): Promise<string> {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'kernex-store-'));
  tempDirs.push(dir);
  return dir;
}

afterAll(async () => {
  await Promise.all(tempDirs.map((dir) => rm(dir, { recursive: true, force: true })));
});

let contractDir: string | undefined;
const openFiles = async (): Promise<Store> => {
  contractDir ??= await tempDir();
  return createNedbStore({ dir: contractDir });
};

storeContract('nedb files', openFiles, { reopen: openFiles });
storeContract('nedb in memory', () => createNedbStore({ inMemory: true }));

async function rejection(op: Promise<unknown>): Promise<unknown> {
  return op.then(
    () => {
      throw new Error('expected the operation to fail');
    },
    (error: unknown) => error,
  );
}

describe('nedb store on a broken filesystem', () => {
  // Tests run as root, where permission bits stop nothing: the failures are
  // made with paths that no one can write through.

  test('a data directory below a regular file is refused at creation', async () => {
    const dir = await tempDir();
    await writeFile(path.join(dir, 'plain-file'), 'x');
    const error = await rejection(createNedbStore({ dir: path.join(dir, 'plain-file', 'db') }));
    expect(error).toBeInstanceOf(StoreUnavailableError);
    expect((error as Error).message).toContain(path.join(dir, 'plain-file', 'db'));
  });

  test('a datafile replaced by a directory fails writes with StoreUnavailableError; a failed write is never seen', async () => {
    const dir = await tempDir();
    const store = await createNedbStore({ dir });
    const devices = store.collection<Doc>('devices');
    await devices.insertOne({ _id: 'd1', status: 'online' });

    const datafile = path.join(dir, 'devices.db');
    await rename(datafile, `${datafile}.aside`);
    await mkdir(datafile);

    const insertError = await rejection(devices.insertOne({ _id: 'd2' }));
    expect(insertError).toBeInstanceOf(StoreUnavailableError);
    expect((insertError as Error).message).toContain(datafile);
    expect((insertError as Error).message).toMatch(/EISDIR/);
    await expect(devices.updateOne({ _id: 'd1' }, { $set: { status: 'x' } })).rejects.toBeInstanceOf(
      StoreUnavailableError,
    );
    await expect(devices.bulkUpdate([{ filter: { _id: 'd1' }, update: { $set: { n: 1 } } }])).rejects.toBeInstanceOf(
      StoreUnavailableError,
    );
    // NeDB had put d2 in its cache before the append failed; that cache is
    // dropped, so reads report the outage instead of showing what is not on disk.
    await expect(devices.count({})).rejects.toBeInstanceOf(StoreUnavailableError);

    // Once the file is usable again, the collection is what the file holds.
    await rm(datafile, { recursive: true });
    await rename(`${datafile}.aside`, datafile);
    expect(await devices.find({})).toEqual([{ _id: 'd1', status: 'online' }]);
    await devices.insertOne({ _id: 'd2' });
    expect(await devices.count({})).toBe(2);
    await store.close();
    await expect(devices.count({})).rejects.toBeInstanceOf(StoreUnavailableError);
  });

  test('a collection whose datafile cannot be loaded fails, then recovers once the file is usable', async () => {
    const dir = await tempDir();
    const store = await createNedbStore({ dir });
    await mkdir(path.join(dir, 'tokens.db'));
    const tokens = store.collection<Doc>('tokens');
    const error = await rejection(tokens.find({}));
    expect(error).toBeInstanceOf(StoreUnavailableError);
    expect((error as Error).message).toContain('tokens.db');

    await rm(path.join(dir, 'tokens.db'), { recursive: true });
    await tokens.insertOne({ _id: 't1' });
    await expect(tokens.find({})).resolves.toEqual([{ _id: 't1' }]);
    await store.close();
  });

  test('background compaction failures are reported, never thrown at the process', async () => {
    const dir = await tempDir();
    const reported: unknown[] = [];
    const unhandled: unknown[] = [];
    const onUnhandled = (reason: unknown): void => {
      unhandled.push(reason);
    };
    process.on('unhandledRejection', onUnhandled);
    try {
      const store = await createNedbStore({ dir, compactEveryMs: 20, onBackgroundError: (e) => reported.push(e) });
      const audit = store.collection<Doc>('audit');
      await audit.insertOne({ _id: 'a1' });
      await rm(path.join(dir, 'audit.db'));
      await mkdir(path.join(dir, 'audit.db'));
      await waitFor(() => reported.length >= 2);
      expect(reported[0]).toBeInstanceOf(StoreUnavailableError);
      await expect(store.close()).rejects.toBeInstanceOf(StoreUnavailableError);

      // Closing stops the timer.
      const count = reported.length;
      await new Promise((resolve) => setTimeout(resolve, 100));
      expect(reported.length).toBe(count);
      expect(unhandled).toEqual([]);
    } finally {
      process.off('unhandledRejection', onUnhandled);
    }
  });
});

describe('nedb store housekeeping', () => {
  test('close compacts the append-only datafile to one line per document', async () => {
    const dir = await tempDir();
    const store = await createNedbStore({ dir });
    const c = store.collection<Doc>('devices');
    await c.insertOne({ _id: 'd1', beats: 0 });
    for (let i = 0; i < 50; i += 1) await c.updateOne({ _id: 'd1' }, { $inc: { beats: 1 } });
    expect(await lines(path.join(dir, 'devices.db'))).toHaveLength(51);
    await store.close();
    expect(await lines(path.join(dir, 'devices.db'))).toHaveLength(1);

    const again = await createNedbStore({ dir });
    await expect(again.collection<Doc>('devices').findOne({ _id: 'd1' })).resolves.toEqual({ _id: 'd1', beats: 50 });
    await again.close();
  });

  test('a heartbeat-style bulk update of 10,000 documents is on disk after a restart', async () => {
    const dir = await tempDir();
    const store = await createNedbStore({ dir });
    const c = store.collection<Doc>('devices');
    await c.ensureIndex({ fields: { device_id: 1 }, unique: true });
    const total = 10_000;
    await c.insertMany(Array.from({ length: total }, (_, i) => ({ _id: `d${i}`, device_id: `dev-${i}`, beats: 0 })));
    await c.bulkUpdate(Array.from({ length: total }, (_, i) => ({
      filter: { device_id: `dev-${i}` }, update: { $set: { uptime: i }, $inc: { beats: 1 } },
    })));
    // Before any compaction: the index definition, the inserts and one line per updated document.
    expect(await lines(path.join(dir, 'devices.db'))).toHaveLength(1 + 2 * total);

    const again = await createNedbStore({ dir: await copyDir(dir) });
    const docs = await again.collection<Doc>('devices').find({ beats: 1 });
    expect(docs).toHaveLength(total);
    expect(docs.every((d) => d.uptime === Number((d.device_id as string).slice(4)))).toBe(true);
    await again.close();
    await store.close();
  });

  test('a bulk update that changes an indexed field keeps the index right', async () => {
    const store = await createNedbStore({ dir: await tempDir() });
    const c = store.collection<Doc>('devices');
    await c.ensureIndex({ fields: { device_id: 1 }, unique: true });
    await c.ensureIndex({ fields: { token_hash: 1 } });
    await c.insertMany([{ _id: 'd1', device_id: 'a', token_hash: 'old-a' }, { _id: 'd2', device_id: 'b', token_hash: 'old-b' }]);
    await c.bulkUpdate([
      { filter: { device_id: 'a' }, update: { $set: { token_hash: 'new-a' } } },
      { filter: { device_id: 'b' }, update: { $set: { uptime: 5 } } },
    ]);
    await expect(c.findOne({ token_hash: 'new-a' })).resolves.toEqual({ _id: 'd1', device_id: 'a', token_hash: 'new-a' });
    await expect(c.findOne({ token_hash: 'old-a' })).resolves.toBeNull();
    await expect(c.findOne({ token_hash: 'old-b' })).resolves.toEqual({ _id: 'd2', device_id: 'b', token_hash: 'old-b', uptime: 5 });
    await store.close();
  });

  test('a bulk update touching one document twice applies both, in order', async () => {
    const store = await createNedbStore({ dir: await tempDir() });
    const c = store.collection<Doc>('devices');
    await c.insertOne({ _id: 'd1', device_id: 'a', beats: 0 });
    await c.bulkUpdate([
      { filter: { device_id: 'a' }, update: { $inc: { beats: 1 }, $set: { last: 1 } } },
      { filter: { device_id: 'a' }, update: { $inc: { beats: 1 }, $set: { last: 2 } } },
    ]);
    await expect(c.findOne({ _id: 'd1' })).resolves.toEqual({ _id: 'd1', device_id: 'a', beats: 2, last: 2 });
    await store.close();
  });

  test('compactEveryMs compacts loaded collections in the background', async () => {
    const dir = await tempDir();
    const store = await createNedbStore({ dir, compactEveryMs: 20 });
    const c = store.collection<Doc>('devices');
    await c.insertOne({ _id: 'd1', beats: 0 });
    for (let i = 0; i < 20; i += 1) await c.updateOne({ _id: 'd1' }, { $inc: { beats: 1 } });
    const datafile = path.join(dir, 'devices.db');
    await waitForAsync(async () => (await lines(datafile)).length === 1);
    await store.close();
  });

  test('collection names must be plain file names', async () => {
    const store = await createNedbStore({ inMemory: true });
    for (const name of ['../escape', 'a/b', '', '.hidden', 'x'.repeat(101)]) {
      expect(() => store.collection(name)).toThrow(/invalid collection name/);
    }
    expect(() => store.collection('device_bundle_history')).not.toThrow();
    await store.close();
  });

  test('options are checked', async () => {
    await expect(createNedbStore({})).rejects.toThrow(/dir/);
    await expect(createNedbStore({ dir: await tempDir(), compactEveryMs: 0 })).rejects.toThrow(/compactEveryMs/);
  });
});

describe('openStore (embedded)', () => {
  test('keeps one datafile per collection under <dataDir>/db', async () => {
    const dataDir = await tempDir();
    const store = await openStore({ dataDir });
    await store.collection<Doc>('devices').insertOne({ _id: 'd1' });
    await store.collection<Doc>('deployments').insertOne({ _id: 'x1' });
    await store.close();
    expect((await readdir(path.join(dataDir, 'db'))).sort()).toEqual(['deployments.db', 'devices.db']);

    const reopened = await openStore({ dataDir });
    await expect(reopened.collection<Doc>('devices').find({})).resolves.toEqual([{ _id: 'd1' }]);
    await reopened.close();
  });

  test('in memory writes no datafile', async () => {
    const dataDir = await tempDir();
    const store = await openStore({ dataDir, inMemory: true });
    await store.collection<Doc>('devices').insertOne({ _id: 'd1' });
    await expect(store.collection<Doc>('devices').count({})).resolves.toBe(1);
    await store.close();
    expect(await readdir(dataDir)).toEqual([]);
  });
});

/** A copy of a data directory as it is on disk now (what a crash would leave). */
async function copyDir(dir: string): Promise<string> {
  const copy = await tempDir();
  await cp(dir, copy, { recursive: true });
  return copy;
}

async function lines(file: string): Promise<string[]> {
  return (await readFile(file, 'utf8')).split('\n').filter((line) => line !== '');
}

async function waitFor(condition: () => boolean, timeoutMs = 5000): Promise<void> {
  return waitForAsync(async () => condition(), timeoutMs);
}

async function waitForAsync(condition: () => Promise<boolean>, timeoutMs = 5000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await condition())) {
    if (Date.now() > deadline) throw new Error('condition not met in time');
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}
