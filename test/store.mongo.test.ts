// The MongoDB backend: the same contract as the embedded one whenever
// KERNEX_TEST_MONGO_URL names a server (none can be installed where this
// project is built), and the pure translation parts of mongo.ts always.

import { randomUUID } from 'node:crypto';
import mongoose from 'mongoose';
import {
  createMongoStore,
  mapMongoError,
  redactUrl,
  toBulkWriteOperations,
  toMongoIndex,
  withUpsertId,
} from '../controller/store/mongo.js';
import { DuplicateKeyError, StoreUnavailableError, openStore } from '../controller/store/index.js';
import { storeContract } from './store.contract.js';

const mongoUrl = process.env.KERNEX_TEST_MONGO_URL;

if (mongoUrl) {
  // A database of its own, dropped afterwards: never the one the URL names.
  const dbName = `kernex_test_${randomUUID().slice(0, 8)}`;
  const open = () => createMongoStore(mongoUrl, { dbName, serverSelectionTimeoutMS: 5000 });
  storeContract('mongodb', open, {
    reopen: open,
    cleanup: async () => {
      const connection = await mongoose.createConnection(mongoUrl, { dbName }).asPromise();
      try {
        await connection.dropDatabase();
      } finally {
        await connection.close();
      }
    },
  });
} else {
  describe('store contract: mongodb — skipped: KERNEX_TEST_MONGO_URL not set', () => {
    test('skipped: KERNEX_TEST_MONGO_URL not set (set it to a MongoDB URL to run the contract against MongoDB)', () => {
      console.warn('store contract against MongoDB skipped: KERNEX_TEST_MONGO_URL not set');
      expect(mongoUrl).toBeFalsy();
    });
  });
}

describe('mongo store without a server', () => {
  test('an unreachable server is StoreUnavailableError, and the password stays out of the message', async () => {
    const url = 'mongodb://kernex:s3cret@127.0.0.1:9/kernex?serverSelectionTimeoutMS=300';
    const error: unknown = await createMongoStore(url).then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(error).toBeInstanceOf(StoreUnavailableError);
    expect((error as Error).message).toContain('127.0.0.1:9');
    expect((error as Error).message).not.toContain('s3cret');
  });

  test('openStore takes MongoDB when mongoUrl is set', async () => {
    const error: unknown = await openStore({
      mongoUrl: 'mongodb://127.0.0.1:9/kernex?serverSelectionTimeoutMS=300',
      dataDir: '/nonexistent/never-used',
    }).then(
      () => undefined,
      (e: unknown) => e,
    );
    // Reaching MongoDB (and not creating the NeDB directory) is what failed.
    expect(error).toBeInstanceOf(StoreUnavailableError);
    expect((error as Error).message).toMatch(/MongoDB/);
  });

  test('a malformed URL is a plain configuration error', async () => {
    const error: unknown = await createMongoStore('not-a-url').then(
      () => undefined,
      (e: unknown) => e,
    );
    expect(error).toBeInstanceOf(Error);
    expect(error).not.toBeInstanceOf(StoreUnavailableError);
    expect((error as Error).message).toMatch(/invalid MongoDB URL/);
  });
});

describe('mongo.ts pure parts', () => {
  describe('mapMongoError', () => {
    test('duplicate key (11000, 11001) becomes DuplicateKeyError', () => {
      const server = new mongoose.mongo.MongoServerError({
        message: 'E11000 duplicate key error collection: k.devices index: device_id_1 dup key: { device_id: "a" }',
        code: 11000,
      });
      const mapped = mapMongoError(server);
      expect(mapped).toBeInstanceOf(DuplicateKeyError);
      expect((mapped as Error).message).toContain('device_id_1');
      expect(mapMongoError({ name: 'MongoServerError', message: 'old style', code: 11001 })).toBeInstanceOf(
        DuplicateKeyError,
      );
    });

    test('a bulk write whose operations hit a duplicate becomes DuplicateKeyError', () => {
      const bulk = { name: 'MongoBulkWriteError', message: 'E11000', writeErrors: [{ code: 11000, index: 3 }] };
      expect(mapMongoError(bulk)).toBeInstanceOf(DuplicateKeyError);
      expect(mapMongoError({ ...bulk, writeErrors: { code: 11000 } })).toBeInstanceOf(DuplicateKeyError);
      expect(mapMongoError({ ...bulk, writeErrors: [{ code: 2 }] })).not.toBeInstanceOf(DuplicateKeyError);
    });

    test.each([
      'MongoNetworkError',
      'MongoNetworkTimeoutError',
      'MongoServerSelectionError',
      'MongooseServerSelectionError',
      'MongoTopologyClosedError',
      'MongoNotConnectedError',
      'MongoPoolClearedError',
    ])('%s becomes StoreUnavailableError', (name) => {
      const mapped = mapMongoError({ name, message: 'connect ECONNREFUSED 127.0.0.1:27017' });
      expect(mapped).toBeInstanceOf(StoreUnavailableError);
      expect((mapped as Error).message).toContain('ECONNREFUSED');
      expect((mapped as StoreUnavailableError).cause).toEqual({ name, message: 'connect ECONNREFUSED 127.0.0.1:27017' });
    });

    test('real driver network errors become StoreUnavailableError', () => {
      expect(mapMongoError(new mongoose.mongo.MongoNetworkError('socket closed'))).toBeInstanceOf(StoreUnavailableError);
      expect(mapMongoError(new mongoose.mongo.MongoNetworkTimeoutError('timed out'))).toBeInstanceOf(
        StoreUnavailableError,
      );
    });

    test('server codes meaning "cannot serve now" become StoreUnavailableError', () => {
      for (const code of [91, 189, 10107, 11600, 13435]) {
        expect(mapMongoError({ name: 'MongoServerError', message: 'not primary', code })).toBeInstanceOf(
          StoreUnavailableError,
        );
      }
    });

    test('other errors pass through unchanged', () => {
      const invalid = { name: 'MongoServerError', message: 'unknown operator: $foo', code: 2 };
      expect(mapMongoError(invalid)).toBe(invalid);
      const plain = new TypeError('boom');
      expect(mapMongoError(plain)).toBe(plain);
      expect(mapMongoError('text')).toBe('text');
      const already = new DuplicateKeyError('x');
      expect(mapMongoError(already)).toBe(already);
    });
  });

  describe('toBulkWriteOperations', () => {
    test('each port update becomes one updateOne, upsert only where asked', () => {
      const ops = toBulkWriteOperations(
        [
          { filter: { device_id: 'a' }, update: { $set: { status: 'online' }, $inc: { beats: 1 } } },
          { filter: { _id: 'b' }, update: { $set: { status: 'new' } }, upsert: true },
        ],
        () => 'generated',
      );
      expect(ops).toEqual([
        { updateOne: { filter: { device_id: 'a' }, update: { $set: { status: 'online' }, $inc: { beats: 1 } }, upsert: false } },
        { updateOne: { filter: { _id: 'b' }, update: { $set: { status: 'new' } }, upsert: true } },
      ]);
    });

    test('an upsert whose filter does not fix _id gets a string _id on insert only', () => {
      let n = 0;
      const ops = toBulkWriteOperations(
        [
          { filter: { device_id: 'a' }, update: { $set: { s: 1 }, $setOnInsert: { created: true } }, upsert: true },
          { filter: { device_id: 'b' }, update: { $inc: { beats: 1 } }, upsert: true },
        ],
        () => `id-${++n}`,
      );
      expect(ops).toEqual([
        {
          updateOne: {
            filter: { device_id: 'a' },
            update: { $set: { s: 1 }, $setOnInsert: { created: true, _id: 'id-1' } },
            upsert: true,
          },
        },
        {
          updateOne: {
            filter: { device_id: 'b' },
            update: { $inc: { beats: 1 }, $setOnInsert: { _id: 'id-2' } },
            upsert: true,
          },
        },
      ]);
    });

    test('an empty batch translates to nothing', () => {
      expect(toBulkWriteOperations([])).toEqual([]);
    });
  });

  describe('withUpsertId', () => {
    const id = () => 'new-id';
    test.each([
      ['an _id equality in the filter', { _id: 'x' }, { $set: { a: 1 } }],
      ['an _id $eq in the filter', { _id: { $eq: 'x' } }, { $set: { a: 1 } }],
      ['an _id in $set', { n: 1 }, { $set: { _id: 'x' } }],
      ['an _id in $setOnInsert', { n: 1 }, { $setOnInsert: { _id: 'x' } }],
    ])('leaves the update alone given %s', (_title, filter, update) => {
      expect(withUpsertId(filter, update, id)).toBe(update);
    });

    test('adds one otherwise, also when the filter only constrains _id', () => {
      expect(withUpsertId({ _id: { $in: ['a', 'b'] } }, { $set: { a: 1 } }, id)).toEqual({
        $set: { a: 1 },
        $setOnInsert: { _id: 'new-id' },
      });
    });

    test('does not mutate the update it is given', () => {
      const update = { $setOnInsert: { created: true } };
      withUpsertId({ n: 1 }, update, id);
      expect(update).toEqual({ $setOnInsert: { created: true } });
    });
  });

  describe('toMongoIndex', () => {
    test('keeps field order and directions; unique only when asked', () => {
      expect(toMongoIndex({ fields: { device_id: 1, deployed_at: -1 } })).toEqual({
        key: { device_id: 1, deployed_at: -1 },
        options: {},
      });
      const unique = toMongoIndex({ fields: { token_hash: 1 }, unique: true });
      expect(unique).toEqual({ key: { token_hash: 1 }, options: { unique: true } });
      expect(Object.keys(toMongoIndex({ fields: { b: 1, a: 1 } }).key)).toEqual(['b', 'a']);
    });

    test('refuses an index without fields or with a bad direction', () => {
      expect(() => toMongoIndex({ fields: {} })).toThrow(/at least one field/);
      expect(() => toMongoIndex({ fields: { a: 2 as 1 } })).toThrow(/direction/);
    });
  });

  test('redactUrl hides user info', () => {
    expect(redactUrl('mongodb://user:pw@host:27017/db')).toBe('mongodb://***@host:27017/db');
    expect(redactUrl('mongodb+srv://user:pw@cluster.example/db?x=1')).toBe('mongodb+srv://***@cluster.example/db?x=1');
    expect(redactUrl('mongodb://host:27017/db')).toBe('mongodb://host:27017/db');
  });
});
