// The store contract: what every backend of controller/store must do, in
// MongoDB's terms (the repositories are written against those). Each backend
// suite calls storeContract() with a way to open its store.

import {
  DuplicateKeyError,
  StoreUnavailableError,
  type Collection,
  type Store,
  type StoredDocument,
  type Update,
} from '../controller/store/index.js';

export interface ContractOptions {
  /** Runs after the suite, once its store is closed (drop databases, remove directories). */
  cleanup?: () => Promise<void>;
  /**
   * Opens another store over the same data as `open`. Given only by backends
   * that persist: the persistence test closes one store and reads its data
   * back through a fresh one.
   */
  reopen?: () => Promise<Store>;
}

interface Doc extends StoredDocument {
  [field: string]: unknown;
}

/** Values matching nothing, to make a list long. */
const filler = (n: number) => Array.from({ length: n }, (_, i) => `nobody-${i}`);

const FLEET: Doc[] = [
  {
    _id: 'd1',
    device_id: 'alpha',
    status: 'online',
    n: 1,
    tags: ['eu', 'beta'],
    meta: { region: 'eu', rack: 1 },
    last_heartbeat: new Date('2024-01-01T00:00:00Z'),
  },
  {
    _id: 'd2',
    device_id: 'bravo',
    status: 'offline',
    n: 2,
    tags: ['us'],
    meta: { region: 'us', rack: 2 },
    last_heartbeat: new Date('2024-01-02T00:00:00Z'),
    error_message: 'boom',
  },
  { _id: 'd3', device_id: 'charlie', status: 'online', n: 3, tags: [], meta: { region: 'eu', rack: 3 }, error_message: null },
  { _id: 'd4', device_id: 'delta', status: 'updating', n: 4, meta: { region: 'ap', rack: 4 } },
];

const ids = (docs: Doc[]): string[] => docs.map((d) => d._id).sort();
const ordered = (docs: Doc[]): string[] => docs.map((d) => d._id);

export function storeContract(
  name: string,
  open: () => Promise<Store>,
  cleanupOrOptions?: (() => Promise<void>) | ContractOptions,
): void {
  const options: ContractOptions =
    typeof cleanupOrOptions === 'function' ? { cleanup: cleanupOrOptions } : (cleanupOrOptions ?? {});

  describe(`store contract: ${name}`, () => {
    let store: Store;
    // Every test works in collections of its own, so tests share one store.
    const prefix = `k${Date.now().toString(36)}${Math.floor(Math.random() * 1e6).toString(36)}`;
    let counter = 0;
    const freshName = (): string => `${prefix}_${++counter}`;
    const fresh = (): Collection<Doc> => store.collection<Doc>(freshName());
    const seeded = async (): Promise<Collection<Doc>> => {
      const c = fresh();
      await c.insertMany(structuredClone(FLEET));
      return c;
    };

    beforeAll(async () => {
      store = await open();
    });

    afterAll(async () => {
      await store?.close();
      await options.cleanup?.();
    });

    describe('insert and read back', () => {
      test('insertOne returns the document and findOne finds it by _id', async () => {
        const c = fresh();
        const doc: Doc = { _id: 'a', device_id: 'alpha', nested: { deep: [1, 2] } };
        await expect(c.insertOne(doc)).resolves.toEqual(doc);
        await expect(c.findOne({ _id: 'a' })).resolves.toEqual(doc);
        await expect(c.findOne({ _id: 'missing' })).resolves.toBeNull();
      });

      test('insertMany returns the documents; an empty list is a no-op', async () => {
        const c = fresh();
        await expect(c.insertMany(structuredClone(FLEET))).resolves.toEqual(FLEET);
        await expect(c.insertMany([])).resolves.toEqual([]);
        expect(await c.count({})).toBe(4);
        expect(await c.find({}, { sort: { _id: 1 } })).toEqual(FLEET);
      });

      test('dates round-trip as Date objects', async () => {
        const c = await seeded();
        const d1 = await c.findOne({ _id: 'd1' });
        expect(d1?.last_heartbeat).toBeInstanceOf(Date);
        expect((d1?.last_heartbeat as Date).toISOString()).toBe('2024-01-01T00:00:00.000Z');
      });

      test('a collection nobody wrote to is empty', async () => {
        const c = fresh();
        await expect(c.find({})).resolves.toEqual([]);
        await expect(c.count({})).resolves.toBe(0);
        await expect(c.findOne({})).resolves.toBeNull();
      });
    });

    describe('filters', () => {
      const cases: Array<[string, Record<string, unknown>, string[]]> = [
        ['string equality', { status: 'online' }, ['d1', 'd3']],
        ['number equality', { n: 2 }, ['d2']],
        ['two fields', { status: 'online', n: 3 }, ['d3']],
        ['dotted path', { 'meta.region': 'eu' }, ['d1', 'd3']],
        ['whole sub-document', { meta: { region: 'us', rack: 2 } }, ['d2']],
        ['array holding a value', { tags: 'eu' }, ['d1']],
        ['$in', { status: { $in: ['offline', 'updating'] } }, ['d2', 'd4']],
        ['$in on an array field', { tags: { $in: ['us', 'beta'] } }, ['d1', 'd2']],
        ['$nin', { status: { $nin: ['online'] } }, ['d2', 'd4']],
        ['$ne', { status: { $ne: 'online' } }, ['d2', 'd4']],
        ['$lt', { n: { $lt: 2 } }, ['d1']],
        ['$lte', { n: { $lte: 2 } }, ['d1', 'd2']],
        ['$gt', { n: { $gt: 3 } }, ['d4']],
        ['$gte', { n: { $gte: 3 } }, ['d3', 'd4']],
        ['range', { n: { $gt: 1, $lt: 4 } }, ['d2', 'd3']],
        ['range on a dotted path', { 'meta.rack': { $gte: 3 } }, ['d3', 'd4']],
        ['string range', { device_id: { $gte: 'bravo', $lt: 'delta' } }, ['d2', 'd3']],
        ['date range', { last_heartbeat: { $lt: new Date('2024-01-01T12:00:00Z') } }, ['d1']],
        ['$exists: true', { last_heartbeat: { $exists: true } }, ['d1', 'd2']],
        ['$exists: false', { last_heartbeat: { $exists: false } }, ['d3', 'd4']],
        ['$or', { $or: [{ status: 'offline' }, { n: { $gte: 4 } }] }, ['d2', 'd4']],
        ['$or with a field beside it', { 'meta.region': 'eu', $or: [{ n: 1 }, { n: 4 }] }, ['d1']],
        ['empty filter', {}, ['d1', 'd2', 'd3', 'd4']],
        ['no match', { status: 'gone' }, []],
        // MongoDB's semantics where embedded engines tend to differ:
        ['$ne matches documents without the field', { error_message: { $ne: 'boom' } }, ['d1', 'd3', 'd4']],
        ['$ne on an array field excludes arrays holding the value', { tags: { $ne: 'eu' } }, ['d2', 'd3', 'd4']],
        ['$nin on an array field excludes arrays holding a value', { tags: { $nin: ['eu', 'us'] } }, ['d3', 'd4']],
        ['null matches null and missing fields', { error_message: null }, ['d1', 'd3', 'd4']],
        ['$ne: null means present and not null', { error_message: { $ne: null } }, ['d2']],
        ['$in with null matches missing fields', { error_message: { $in: [null, 'boom'] } }, ['d1', 'd2', 'd3', 'd4']],
        ['$exists: true holds for an empty array', { tags: { $exists: true } }, ['d1', 'd2', 'd3']],
        // Long lists (a deployment's targets) take another path in some engines.
        ['$in with a long list', { device_id: { $in: [...filler(600), 'charlie', 'alpha'] } }, ['d1', 'd3']],
        ['$in with a long list on an array field', { tags: { $in: [...filler(600), 'us'] } }, ['d2']],
        ['$nin with a long list', { device_id: { $nin: [...filler(600), 'bravo'] } }, ['d1', 'd3', 'd4']],
        ['$nin with a long list on an array field', { tags: { $nin: [...filler(600), 'eu', 'us'] } }, ['d3', 'd4']],
        ['$in with a long list of numbers', { n: { $in: [...Array.from({ length: 500 }, (_, i) => 100 + i), 2] } }, ['d2']],
      ];

      test.each(cases)('%s', async (_title, filter, expected) => {
        const c = await seeded();
        expect(ids(await c.find(filter))).toEqual(expected);
        expect(await c.count(filter)).toBe(expected.length);
      });

      test('filter values are data: a field holding "$ne" is matched literally', async () => {
        const c = fresh();
        await c.insertMany([
          { _id: 'lit', op: '$ne', nested: { k: '$gt' }, list: ['$in'] },
          { _id: 'other', op: 'x', nested: { k: 'y' }, list: ['z'] },
        ]);
        expect(ids(await c.find({ op: '$ne' }))).toEqual(['lit']);
        expect(ids(await c.find({ 'nested.k': '$gt' }))).toEqual(['lit']);
        expect(ids(await c.find({ list: '$in' }))).toEqual(['lit']);
        expect(ids(await c.find({ op: { $in: ['$ne', '$where'] } }))).toEqual(['lit']);
        expect(ids(await c.find({ op: { $ne: '$ne' } }))).toEqual(['other']);
        expect(ids(await c.find({ op: '{"$ne":null}' }))).toEqual([]);
      });
    });

    describe('find options', () => {
      test('sort ascending and descending', async () => {
        const c = await seeded();
        expect(ordered(await c.find({}, { sort: { n: 1 } }))).toEqual(['d1', 'd2', 'd3', 'd4']);
        expect(ordered(await c.find({}, { sort: { n: -1 } }))).toEqual(['d4', 'd3', 'd2', 'd1']);
        expect(ordered(await c.find({}, { sort: { device_id: -1 } }))).toEqual(['d4', 'd3', 'd2', 'd1']);
      });

      test('sort on a dotted path, then a second key', async () => {
        const c = await seeded();
        expect(ordered(await c.find({}, { sort: { 'meta.region': 1, n: -1 } }))).toEqual(['d4', 'd3', 'd1', 'd2']);
      });

      test('sort by date', async () => {
        const c = await seeded();
        const found = await c.find({ last_heartbeat: { $exists: true } }, { sort: { last_heartbeat: -1 } });
        expect(ordered(found)).toEqual(['d2', 'd1']);
      });

      test('skip and limit apply after the sort', async () => {
        const c = await seeded();
        expect(ordered(await c.find({}, { sort: { n: 1 }, skip: 1, limit: 2 }))).toEqual(['d2', 'd3']);
        expect(ordered(await c.find({}, { sort: { n: -1 }, limit: 2 }))).toEqual(['d4', 'd3']);
        expect(ordered(await c.find({}, { sort: { n: 1 }, skip: 3 }))).toEqual(['d4']);
        expect(await c.find({}, { sort: { n: 1 }, skip: 10 })).toEqual([]);
        expect(await c.find({}, { limit: 3 })).toHaveLength(3);
      });

      test('findOne honours sort and skip', async () => {
        const c = await seeded();
        expect((await c.findOne({}, { sort: { n: -1 } }))?._id).toBe('d4');
        expect((await c.findOne({ status: 'online' }, { sort: { n: -1 } }))?._id).toBe('d3');
        expect((await c.findOne({}, { sort: { n: 1 }, skip: 2 }))?._id).toBe('d3');
      });
    });

    describe('updates', () => {
      test('updateOne changes exactly one of several matches', async () => {
        const c = await seeded();
        await expect(c.updateOne({ status: 'online' }, { $set: { status: 'rebooting' } })).resolves.toEqual({
          matched: 1,
          modified: 1,
          upserted: false,
        });
        expect(await c.count({ status: 'rebooting' })).toBe(1);
        expect(await c.count({ status: 'online' })).toBe(1);
      });

      test('updateOne without a match changes and inserts nothing', async () => {
        const c = await seeded();
        await expect(c.updateOne({ status: 'gone' }, { $set: { n: 0 } })).resolves.toEqual({
          matched: 0,
          modified: 0,
          upserted: false,
        });
        expect(await c.count({})).toBe(4);
        expect(await c.count({ n: 0 })).toBe(0);
      });

      test('an update that changes nothing counts as matched, not modified', async () => {
        const c = await seeded();
        await expect(c.updateOne({ _id: 'd1' }, { $set: { status: 'online' } })).resolves.toEqual({
          matched: 1,
          modified: 0,
          upserted: false,
        });
        await expect(c.updateMany({}, { $set: { status: 'online' } })).resolves.toEqual({
          matched: 4,
          modified: 2,
          upserted: false,
        });
      });

      test('updateMany changes every match', async () => {
        const c = await seeded();
        await expect(c.updateMany({ 'meta.region': 'eu' }, { $inc: { n: 10 } })).resolves.toEqual({
          matched: 2,
          modified: 2,
          upserted: false,
        });
        expect(ordered(await c.find({}, { sort: { n: 1 } }))).toEqual(['d2', 'd4', 'd1', 'd3']);
        expect((await c.findOne({ _id: 'd3' }))?.n).toBe(13);
        await expect(c.updateMany({ status: 'gone' }, { $set: { n: 0 } })).resolves.toEqual({
          matched: 0,
          modified: 0,
          upserted: false,
        });
      });

      test('$set replaces values and creates nested fields through dotted paths', async () => {
        const c = await seeded();
        await c.updateOne({ _id: 'd4' }, { $set: { status: 'online', 'config.polling_interval': 30, 'meta.rack': 9 } });
        await expect(c.findOne({ _id: 'd4' })).resolves.toEqual({
          _id: 'd4',
          device_id: 'delta',
          status: 'online',
          n: 4,
          meta: { region: 'ap', rack: 9 },
          config: { polling_interval: 30 },
        });
      });

      test('$inc adds to a number and starts a missing field at the increment', async () => {
        const c = await seeded();
        await c.updateOne({ _id: 'd2' }, { $inc: { n: -5, restarts: 1, 'stats.errors': 2 } });
        const d2 = await c.findOne({ _id: 'd2' });
        expect(d2?.n).toBe(-3);
        expect(d2?.restarts).toBe(1);
        expect(d2?.stats).toEqual({ errors: 2 });
      });

      test('$unset removes fields, dotted or not, whatever the value given', async () => {
        const c = await seeded();
        await c.updateOne({ _id: 'd2' }, { $unset: { error_message: '', 'meta.rack': 1, tags: true, absent: 1 } });
        await expect(c.findOne({ _id: 'd2' })).resolves.toEqual({
          _id: 'd2',
          device_id: 'bravo',
          status: 'offline',
          n: 2,
          meta: { region: 'us' },
          last_heartbeat: new Date('2024-01-02T00:00:00Z'),
        });
      });

      test('$push appends, creates a missing array and takes $each', async () => {
        const c = await seeded();
        await c.updateOne({ _id: 'd1' }, { $push: { tags: 'new' } });
        await c.updateOne({ _id: 'd4' }, { $push: { tags: { version: '1.0.0' } } });
        await c.updateOne({ _id: 'd3' }, { $push: { tags: { $each: ['x', 'y'] } } });
        expect((await c.findOne({ _id: 'd1' }))?.tags).toEqual(['eu', 'beta', 'new']);
        expect((await c.findOne({ _id: 'd4' }))?.tags).toEqual([{ version: '1.0.0' }]);
        expect((await c.findOne({ _id: 'd3' }))?.tags).toEqual(['x', 'y']);
      });

      test('operators combine in one update', async () => {
        const c = await seeded();
        await c.updateOne({ _id: 'd1' }, { $set: { status: 'x' }, $inc: { n: 1 }, $unset: { meta: '' }, $push: { tags: 'z' } });
        const d1 = await c.findOne({ _id: 'd1' });
        expect(d1).toMatchObject({ status: 'x', n: 2, tags: ['eu', 'beta', 'z'] });
        expect(d1).not.toHaveProperty('meta');
      });

      test('an update without operators is refused', async () => {
        const c = await seeded();
        await expect(c.updateOne({ _id: 'd1' }, {} as Update)).rejects.toThrow();
        expect(await c.findOne({ _id: 'd1' })).toEqual(FLEET[0]);
      });
    });

    describe('upserts', () => {
      test('upsert inserting: filter equality fields, $set, $inc and $setOnInsert make the new document', async () => {
        const c = await seeded();
        const result = await c.updateOne(
          { device_id: 'echo', 'meta.region': 'eu', status: { $in: ['new', 'pending'] }, n: { $gt: 0 } },
          { $set: { status: 'new' }, $setOnInsert: { _id: 'd5', created_by: 'upsert' }, $inc: { restarts: 1 } },
          { upsert: true },
        );
        expect(result).toEqual({ matched: 0, modified: 0, upserted: true });
        await expect(c.findOne({ _id: 'd5' })).resolves.toEqual({
          _id: 'd5',
          device_id: 'echo',
          meta: { region: 'eu' },
          status: 'new',
          created_by: 'upsert',
          restarts: 1,
        });
        expect(await c.count({})).toBe(5);
      });

      test('upsert updating: $setOnInsert is not applied, the rest is', async () => {
        const c = await seeded();
        const result = await c.updateOne(
          { device_id: 'alpha' },
          { $set: { status: 'new' }, $setOnInsert: { created_by: 'upsert', n: 100 } },
          { upsert: true },
        );
        expect(result).toEqual({ matched: 1, modified: 1, upserted: false });
        const d1 = await c.findOne({ _id: 'd1' });
        expect(d1).toMatchObject({ status: 'new', n: 1 });
        expect(d1).not.toHaveProperty('created_by');
        expect(await c.count({})).toBe(4);
      });

      test('upsert matching with only $setOnInsert leaves the document as it was', async () => {
        const c = await seeded();
        await expect(c.updateOne({ _id: 'd2' }, { $setOnInsert: { n: 100 } }, { upsert: true })).resolves.toEqual({
          matched: 1,
          modified: 0,
          upserted: false,
        });
        expect(await c.findOne({ _id: 'd2' })).toEqual(FLEET[1]);
      });

      test('upsert keeps the _id given by the filter', async () => {
        const c = fresh();
        await c.updateOne({ _id: 'dev-9' }, { $set: { status: 'online' } }, { upsert: true });
        await expect(c.find({})).resolves.toEqual([{ _id: 'dev-9', status: 'online' }]);
      });

      test('upsert with no _id anywhere gives the new document a string _id', async () => {
        const c = fresh();
        await c.updateOne({ device_id: 'foxtrot' }, { $set: { status: 'online' } }, { upsert: true });
        const [doc] = await c.find({});
        expect(typeof doc._id).toBe('string');
        expect(doc._id.length).toBeGreaterThan(0);
        expect(doc).toMatchObject({ device_id: 'foxtrot', status: 'online' });
        await expect(c.findOne({ _id: doc._id })).resolves.toEqual(doc);
      });

      test('concurrent upserts on a unique key create one document and apply every increment', async () => {
        const c = fresh();
        await c.ensureIndex({ fields: { device_id: 1 }, unique: true });
        await Promise.all(
          Array.from({ length: 20 }, () =>
            c.updateOne({ device_id: 'golf' }, { $inc: { beats: 1 }, $setOnInsert: { first: true } }, { upsert: true }),
          ),
        );
        const docs = await c.find({ device_id: 'golf' });
        expect(docs).toHaveLength(1);
        expect(docs[0]).toMatchObject({ beats: 20, first: true });
      });
    });

    describe('findOneAndUpdate', () => {
      test('returns the document after the update', async () => {
        const c = await seeded();
        const after = await c.findOneAndUpdate({ device_id: 'charlie' }, { $inc: { n: 5 }, $set: { status: 'x' } });
        expect(after).toEqual({ ...FLEET[2], n: 8, status: 'x' });
        await expect(c.findOne({ _id: 'd3' })).resolves.toEqual(after);
      });

      test('returns null and changes nothing when nothing matches without upsert', async () => {
        const c = await seeded();
        await expect(c.findOneAndUpdate({ device_id: 'nobody' }, { $set: { n: 0 } })).resolves.toBeNull();
        expect(await c.count({})).toBe(4);
        expect(await c.count({ n: 0 })).toBe(0);
      });

      test('with upsert returns the inserted document', async () => {
        const c = await seeded();
        const inserted = await c.findOneAndUpdate(
          { _id: 'd7', device_id: 'hotel' },
          { $set: { status: 'new' }, $setOnInsert: { n: 0 } },
          { upsert: true },
        );
        expect(inserted).toEqual({ _id: 'd7', device_id: 'hotel', status: 'new', n: 0 });
        await expect(c.findOne({ _id: 'd7' })).resolves.toEqual(inserted);
      });

      test('with upsert on a match applies the update but not $setOnInsert', async () => {
        const c = await seeded();
        const after = await c.findOneAndUpdate(
          { device_id: 'delta' },
          { $set: { status: 'new' }, $setOnInsert: { n: 0 } },
          { upsert: true },
        );
        expect(after).toEqual({ ...FLEET[3], status: 'new' });
      });
    });

    describe('unique indexes', () => {
      const unique = async (): Promise<Collection<Doc>> => {
        const c = await seeded();
        await c.ensureIndex({ fields: { device_id: 1 }, unique: true });
        return c;
      };

      const expectDuplicate = async (op: Promise<unknown>): Promise<void> => {
        const error: unknown = await op.then(
          () => undefined,
          (e: unknown) => e,
        );
        expect(error).toBeInstanceOf(DuplicateKeyError);
        expect((error as DuplicateKeyError).code).toBe('duplicate_key');
      };

      test('insertOne of a duplicate raises DuplicateKeyError and changes nothing', async () => {
        const c = await unique();
        await expectDuplicate(c.insertOne({ _id: 'd9', device_id: 'alpha' }));
        expect(await c.count({})).toBe(4);
        await expect(c.findOne({ _id: 'd9' })).resolves.toBeNull();
        expect(await c.find({ device_id: 'alpha' })).toEqual([FLEET[0]]);
      });

      test('an _id inserted twice raises DuplicateKeyError', async () => {
        const c = await seeded();
        await expectDuplicate(c.insertOne({ _id: 'd1', device_id: 'other' }));
        expect(await c.findOne({ _id: 'd1' })).toEqual(FLEET[0]);
      });

      test('updates that would duplicate raise DuplicateKeyError and leave the document as it was', async () => {
        const c = await unique();
        await expectDuplicate(c.updateOne({ _id: 'd2' }, { $set: { device_id: 'alpha', status: 'x' } }));
        await expectDuplicate(c.updateMany({ _id: 'd2' }, { $set: { device_id: 'alpha' } }));
        await expectDuplicate(c.findOneAndUpdate({ _id: 'd2' }, { $set: { device_id: 'alpha' } }));
        expect(await c.findOne({ _id: 'd2' })).toEqual(FLEET[1]);
      });

      test('an upsert that would insert a duplicate raises DuplicateKeyError', async () => {
        const c = await unique();
        await expectDuplicate(
          c.updateOne({ _id: 'd9' }, { $set: { device_id: 'alpha' } }, { upsert: true }),
        );
        expect(await c.count({})).toBe(4);
      });

      test('creating a unique index over existing duplicates raises DuplicateKeyError', async () => {
        const c = await seeded();
        await expectDuplicate(c.ensureIndex({ fields: { status: 1 }, unique: true }));
        // The refused index does not exist: duplicates are still accepted.
        await c.insertOne({ _id: 'd9', status: 'online' });
        expect(await c.count({ status: 'online' })).toBe(3);
      });

      test('ensureIndex is idempotent', async () => {
        const c = await unique();
        await c.ensureIndex({ fields: { device_id: 1 }, unique: true });
        await c.ensureIndex({ fields: { n: -1 } });
        await c.ensureIndex({ fields: { n: -1 } });
        await expectDuplicate(c.insertOne({ _id: 'd9', device_id: 'bravo' }));
      });

      test('a compound unique index refuses the same pair only', async () => {
        const c = fresh();
        await c.ensureIndex({ fields: { device_id: 1, bundle_version: -1 }, unique: true });
        await c.insertOne({ _id: 'h1', device_id: 'alpha', bundle_version: '1.0.0' });
        await c.insertOne({ _id: 'h2', device_id: 'alpha', bundle_version: '1.1.0' });
        await c.insertOne({ _id: 'h3', device_id: 'bravo', bundle_version: '1.0.0' });
        await expectDuplicate(c.insertOne({ _id: 'h4', device_id: 'alpha', bundle_version: '1.0.0' }));
        expect(await c.count({})).toBe(3);
      });

      test('a non-unique index accepts duplicates and leaves query results alone', async () => {
        const c = await seeded();
        await c.ensureIndex({ fields: { status: 1 } });
        await c.insertOne({ _id: 'd9', status: 'online', n: 9 });
        expect(ids(await c.find({ status: 'online' }))).toEqual(['d1', 'd3', 'd9']);
        expect(ids(await c.find({ status: { $in: ['online', 'offline'] }, n: { $gt: 2 } }))).toEqual(['d3', 'd9']);
      });

      test('a sparse index leaves documents without the field out of it, not out of results', async () => {
        const c = await seeded();
        await c.ensureIndex({ fields: { flag: 1 }, sparse: true });
        await c.ensureIndex({ fields: { due: 1 }, sparse: true });
        await c.updateOne({ _id: 'd2' }, { $set: { flag: true, due: '2026-01-02' } });
        await c.updateOne({ _id: 'd4' }, { $set: { flag: true, due: '2026-01-01' } });
        expect(ids(await c.find({ flag: true }))).toEqual(['d2', 'd4']);
        expect(ids(await c.find({ due: { $gt: '', $lte: '2026-01-01' } }))).toEqual(['d4']);
        await c.updateMany({ _id: { $in: ['d2', 'd4'] }, flag: true }, { $unset: { flag: true } });
        expect(await c.find({ flag: true })).toEqual([]);
        expect(await c.count({})).toBe(4);
        expect(ids(await c.find({ status: 'online' }))).toEqual(['d1', 'd3']);
      });

      test('an _id range selects the documents whose ids share a prefix', async () => {
        const c = fresh();
        await c.insertMany(['dep1:a', 'dep1:b', 'dep10:a', 'dep2:a', 'dep1;x'].map((_id) => ({ _id })));
        expect(ids(await c.find({ _id: { $gte: 'dep1:', $lt: 'dep1;' } }))).toEqual(['dep1:a', 'dep1:b']);
      });
    });

    describe('deletes', () => {
      test('deleteOne removes one match and returns 1, or 0', async () => {
        const c = await seeded();
        await expect(c.deleteOne({ status: 'online' })).resolves.toBe(1);
        expect(await c.count({ status: 'online' })).toBe(1);
        await expect(c.deleteOne({ status: 'gone' })).resolves.toBe(0);
        expect(await c.count({})).toBe(3);
      });

      test('deleteMany removes every match and returns how many', async () => {
        const c = await seeded();
        await expect(c.deleteMany({ 'meta.region': 'eu' })).resolves.toBe(2);
        await expect(c.deleteMany({ 'meta.region': 'eu' })).resolves.toBe(0);
        expect(ids(await c.find({}))).toEqual(['d2', 'd4']);
        await expect(c.deleteMany({})).resolves.toBe(2);
        expect(await c.count({})).toBe(0);
      });
    });

    describe('bulkUpdate', () => {
      test('applies all of 1,000 updates', async () => {
        const c = fresh();
        const total = 1000;
        await c.ensureIndex({ fields: { device_id: 1 }, unique: true });
        await c.insertMany(Array.from({ length: total }, (_, i) => ({ _id: `b${i}`, device_id: `dev-${i}`, beats: 0 })));
        await c.bulkUpdate(
          Array.from({ length: total }, (_, i) => ({
            filter: { device_id: `dev-${i}` },
            update: { $set: { last_heartbeat: new Date(1_700_000_000_000 + i), seq: i }, $inc: { beats: 1 } },
          })),
        );
        expect(await c.count({ beats: 1 })).toBe(total);
        const docs = await c.find({}, { sort: { seq: 1 } });
        expect(docs).toHaveLength(total);
        docs.forEach((doc, i) => {
          expect(doc.device_id).toBe(`dev-${i}`);
          expect((doc.last_heartbeat as Date).getTime()).toBe(1_700_000_000_000 + i);
        });
      });

      test('updates one document per operation, upserts where asked', async () => {
        const c = await seeded();
        await c.bulkUpdate([
          { filter: { status: 'online' }, update: { $set: { status: 'seen' } } },
          { filter: { _id: 'd8' }, update: { $set: { status: 'new' }, $setOnInsert: { n: 8 } }, upsert: true },
          { filter: { _id: 'd2' }, update: { $set: { status: 'seen' }, $setOnInsert: { n: 99 } }, upsert: true },
          { filter: { _id: 'nobody' }, update: { $set: { status: 'seen' } } },
        ]);
        expect(await c.count({ status: 'seen' })).toBe(2);
        expect(await c.count({ status: 'online' })).toBe(1);
        await expect(c.findOne({ _id: 'd8' })).resolves.toEqual({ _id: 'd8', status: 'new', n: 8 });
        expect((await c.findOne({ _id: 'd2' }))?.n).toBe(2);
        expect(await c.count({})).toBe(5);
      });

      test('an empty batch does nothing', async () => {
        const c = await seeded();
        await expect(c.bulkUpdate([])).resolves.toBeUndefined();
        expect(await c.find({}, { sort: { _id: 1 } })).toEqual(FLEET);
      });

      test('a refused operation raises DuplicateKeyError after the others are applied', async () => {
        const c = await seeded();
        await c.ensureIndex({ fields: { device_id: 1 }, unique: true });
        const error: unknown = await c
          .bulkUpdate([
            { filter: { _id: 'd1' }, update: { $set: { status: 'a' } } },
            { filter: { _id: 'd2' }, update: { $set: { device_id: 'alpha' } } },
            { filter: { _id: 'd3' }, update: { $set: { status: 'c' } } },
          ])
          .then(
            () => undefined,
            (e: unknown) => e,
          );
        expect(error).toBeInstanceOf(DuplicateKeyError);
        expect((await c.findOne({ _id: 'd1' }))?.status).toBe('a');
        expect((await c.findOne({ _id: 'd2' }))?.device_id).toBe('bravo');
        expect((await c.findOne({ _id: 'd3' }))?.status).toBe('c');
      });
    });

    describe('returned documents are copies', () => {
      test('mutating what insertOne was given or returned leaves the store alone', async () => {
        const c = fresh();
        const doc: Doc = { _id: 'c1', meta: { region: 'eu' }, tags: ['a'] };
        const returned = await c.insertOne(doc);
        (doc.meta as Record<string, unknown>).region = 'changed';
        (doc.tags as string[]).push('changed');
        (returned.meta as Record<string, unknown>).region = 'changed too';
        returned.extra = true;
        await expect(c.findOne({ _id: 'c1' })).resolves.toEqual({ _id: 'c1', meta: { region: 'eu' }, tags: ['a'] });
      });

      test('mutating found documents leaves the store alone', async () => {
        const c = await seeded();
        const one = await c.findOne({ _id: 'd1' });
        (one?.meta as Record<string, unknown>).region = 'changed';
        (one?.tags as string[]).length = 0;
        const all = await c.find({});
        for (const doc of all) doc.status = 'changed';
        (all[0].last_heartbeat as Date | undefined)?.setTime(0);
        const after = await c.findOneAndUpdate({ _id: 'd2' }, { $set: { n: 20 } });
        (after?.meta as Record<string, unknown>).region = 'changed';
        expect(await c.find({}, { sort: { _id: 1 } })).toEqual([FLEET[0], { ...FLEET[1], n: 20 }, FLEET[2], FLEET[3]]);
        expect(await c.findOne({ _id: 'd1' })).not.toBe(await c.findOne({ _id: 'd1' }));
      });

      test('mutating an update after it ran leaves the store alone', async () => {
        const c = await seeded();
        const tags = ['x'];
        const config = { polling_interval: 30 };
        await c.updateOne({ _id: 'd1' }, { $set: { tags, config } });
        const pushed = { version: '1.0.0' };
        await c.updateOne({ _id: 'd1' }, { $push: { history: pushed } });
        tags.push('changed');
        config.polling_interval = 0;
        pushed.version = 'changed';
        expect(await c.findOne({ _id: 'd1' })).toMatchObject({
          tags: ['x'],
          config: { polling_interval: 30 },
          history: [{ version: '1.0.0' }],
        });
      });
    });

    describe('lifecycle', () => {
      test('a closed store refuses operations with StoreUnavailableError', async () => {
        const other = await open();
        const c = other.collection<Doc>(freshName());
        await c.insertOne({ _id: 'x' });
        await other.close();
        await other.close();
        await expect(c.count({})).rejects.toBeInstanceOf(StoreUnavailableError);
        await expect(c.insertOne({ _id: 'y' })).rejects.toBeInstanceOf(StoreUnavailableError);
      });

      const { reopen } = options;
      if (reopen) {
        test('data, updates, deletes and unique indexes survive close and reopen', async () => {
          const collectionName = freshName();
          const first = await reopen();
          const c1 = first.collection<Doc>(collectionName);
          await c1.ensureIndex({ fields: { device_id: 1 }, unique: true });
          await c1.insertMany(structuredClone(FLEET));
          await c1.updateOne({ _id: 'd1' }, { $set: { status: 'persisted' }, $push: { tags: 'p' } });
          await c1.updateOne({ _id: 'd5' }, { $set: { device_id: 'echo' } }, { upsert: true });
          await c1.deleteOne({ _id: 'd4' });
          await first.close();

          const second = await reopen();
          try {
            const c2 = second.collection<Doc>(collectionName);
            expect(await c2.find({}, { sort: { _id: 1 } })).toEqual([
              { ...FLEET[0], status: 'persisted', tags: ['eu', 'beta', 'p'] },
              FLEET[1],
              FLEET[2],
              { _id: 'd5', device_id: 'echo' },
            ]);
            await expect(c2.insertOne({ _id: 'd6', device_id: 'alpha' })).rejects.toBeInstanceOf(DuplicateKeyError);
          } finally {
            await second.close();
          }
        });
      }
    });
  });
}
