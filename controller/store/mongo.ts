// MongoDB backend. Deliberately thin: mongoose only opens the connection, every
// operation goes to the native driver collection, since the port already
// speaks MongoDB's language. The pure parts (error mapping, bulk and index
// translation, upsert ids) are exported so they are tested without a server.

import { randomUUID } from 'node:crypto';
import mongoose, { type mongo } from 'mongoose';
import {
  DuplicateKeyError,
  StoreUnavailableError,
  type BulkUpdate,
  type Collection,
  type Filter,
  type FindOptions,
  type IndexSpec,
  type Store,
  type StoredDocument,
  type Update,
  type UpdateOptions,
  type UpdateResult,
} from './port.js';

export interface MongoStoreOptions {
  /** Database to use when the URL names none (or to override it). */
  dbName?: string;
  /** How long an operation waits for a reachable server before failing; the driver's default is 30 s. */
  serverSelectionTimeoutMS?: number;
}

export async function createMongoStore(url: string, options: MongoStoreOptions = {}): Promise<Store> {
  const connectOptions: mongoose.ConnectOptions = {
    // Parity with the embedded store, which drops undefined fields instead of storing null.
    ignoreUndefined: true,
    autoIndex: false,
    autoCreate: false,
  };
  if (options.dbName !== undefined) connectOptions.dbName = options.dbName;
  if (options.serverSelectionTimeoutMS !== undefined) {
    connectOptions.serverSelectionTimeoutMS = options.serverSelectionTimeoutMS;
  }

  let connection: mongoose.Connection | undefined;
  try {
    connection = mongoose.createConnection(url, connectOptions);
    await connection.asPromise();
  } catch (error) {
    await connection?.close(true).catch(() => undefined);
    throw connectError(url, error);
  }

  const db = connection.db;
  if (!db) {
    await connection.close(true).catch(() => undefined);
    throw new StoreUnavailableError(`MongoDB at ${redactUrl(url)} connected without a database handle`);
  }

  const opened = connection;
  let closed = false;
  return {
    collection<T extends StoredDocument>(name: string): Collection<T> {
      return new MongoCollection<T>(db.collection<Raw>(name), () => closed);
    },
    async close(): Promise<void> {
      if (closed) return;
      closed = true;
      await opened.close();
    },
  };
}

// What the driver sees: the port's string `_id` instead of its default ObjectId.
interface Raw extends mongo.Document {
  _id: string;
}

class MongoCollection<T extends StoredDocument> implements Collection<T> {
  constructor(
    private readonly coll: mongo.Collection<Raw>,
    private readonly isClosed: () => boolean,
  ) {}

  insertOne(doc: T): Promise<T> {
    return this.run(async () => {
      // The driver mutates what it inserts; the caller keeps its object and gets its own copy.
      const copy = copyValue(doc);
      await this.coll.insertOne(copy as StoredDocument as Raw);
      return copy;
    });
  }

  insertMany(docs: T[]): Promise<T[]> {
    return this.run(async () => {
      if (docs.length === 0) return [];
      const copies = copyValue(docs);
      await this.coll.insertMany(copies as StoredDocument[] as Raw[]);
      return copies;
    });
  }

  findOne(filter: Filter, options: FindOptions = {}): Promise<T | null> {
    return this.run(async () => {
      const single = findOptions({ sort: options.sort, skip: options.skip });
      return (await this.coll.findOne(asFilter(filter), single)) as T | null;
    });
  }

  find(filter: Filter, options: FindOptions = {}): Promise<T[]> {
    return this.run(async () => (await this.coll.find(asFilter(filter), findOptions(options)).toArray()) as StoredDocument[] as T[]);
  }

  count(filter: Filter): Promise<number> {
    return this.run(() => this.coll.countDocuments(asFilter(filter)));
  }

  updateOne(filter: Filter, update: Update, options: UpdateOptions = {}): Promise<UpdateResult> {
    const upsert = options.upsert ?? false;
    return this.run(async () =>
      toUpdateResult(await this.coll.updateOne(asFilter(filter), asUpdate(upsert ? withUpsertId(filter, update) : update), { upsert })),
    );
  }

  updateMany(filter: Filter, update: Update): Promise<UpdateResult> {
    return this.run(async () => toUpdateResult(await this.coll.updateMany(asFilter(filter), asUpdate(update))));
  }

  findOneAndUpdate(filter: Filter, update: Update, options: UpdateOptions = {}): Promise<T | null> {
    const upsert = options.upsert ?? false;
    return this.run(
      async () =>
        (await this.coll.findOneAndUpdate(asFilter(filter), asUpdate(upsert ? withUpsertId(filter, update) : update), {
          upsert,
          returnDocument: 'after',
        })) as T | null,
    );
  }

  deleteOne(filter: Filter): Promise<number> {
    return this.run(async () => (await this.coll.deleteOne(asFilter(filter))).deletedCount);
  }

  deleteMany(filter: Filter): Promise<number> {
    return this.run(async () => (await this.coll.deleteMany(asFilter(filter))).deletedCount);
  }

  bulkUpdate(ops: BulkUpdate[]): Promise<void> {
    return this.run(async () => {
      // The driver refuses an empty batch.
      if (ops.length === 0) return;
      await this.coll.bulkWrite(toBulkWriteOperations(ops), { ordered: false });
    });
  }

  ensureIndex(spec: IndexSpec): Promise<void> {
    return this.run(async () => {
      const { key, options } = toMongoIndex(spec);
      await this.coll.createIndex(key, options);
    });
  }

  private async run<R>(op: () => Promise<R>): Promise<R> {
    if (this.isClosed()) {
      throw new StoreUnavailableError(`MongoDB collection "${this.coll.collectionName}": the store is closed`);
    }
    try {
      return await op();
    } catch (error) {
      throw mapMongoError(error);
    }
  }
}

// ------------------------------------------------------------ pure parts --

function asFilter(filter: Filter): mongo.Filter<Raw> {
  return filter as mongo.Filter<Raw>;
}

function asUpdate(update: Update): mongo.UpdateFilter<Raw> {
  return update as mongo.UpdateFilter<Raw>;
}

function findOptions(options: FindOptions): mongo.FindOptions {
  const result: mongo.FindOptions = {};
  if (options.sort && Object.keys(options.sort).length > 0) result.sort = options.sort;
  if (options.skip) result.skip = options.skip;
  if (options.limit) result.limit = options.limit;
  return result;
}

function toUpdateResult(result: mongo.UpdateResult): UpdateResult {
  return { matched: result.matchedCount, modified: result.modifiedCount, upserted: result.upsertedCount > 0 };
}

/**
 * Left alone, MongoDB gives an upserted document an ObjectId `_id`; the port
 * promises string ids, so an upsert whose filter and update do not fix the
 * `_id` gets a UUID through `$setOnInsert` (ignored when a document matches).
 */
export function withUpsertId(filter: Filter, update: Update, newId: () => string = randomUUID): Update {
  if (filterFixesId(filter) || update.$set?._id !== undefined || update.$setOnInsert?._id !== undefined) return update;
  return { ...update, $setOnInsert: { ...update.$setOnInsert, _id: newId() } };
}

function filterFixesId(filter: Filter): boolean {
  const id = filter._id;
  if (id === undefined) return false;
  if (typeof id !== 'object' || id === null || Array.isArray(id)) return true;
  const keys = Object.keys(id);
  return !keys.every((k) => k.startsWith('$')) || keys.includes('$eq');
}

/** One unordered `bulkWrite` batch: each port update becomes an `updateOne`. */
export function toBulkWriteOperations(ops: BulkUpdate[], newId: () => string = randomUUID): mongo.AnyBulkWriteOperation<Raw>[] {
  return ops.map((op) => {
    const upsert = op.upsert ?? false;
    return {
      updateOne: {
        filter: asFilter(op.filter),
        update: asUpdate(upsert ? withUpsertId(op.filter, op.update, newId) : op.update),
        upsert,
      },
    };
  });
}

export function toMongoIndex(spec: IndexSpec): { key: Record<string, 1 | -1>; options: mongo.CreateIndexesOptions } {
  const fields = Object.entries(spec.fields);
  if (fields.length === 0) throw new Error('ensureIndex: an index needs at least one field');
  for (const [field, direction] of fields) {
    if (direction !== 1 && direction !== -1) throw new Error(`ensureIndex: direction of "${field}" must be 1 or -1`);
  }
  return { key: { ...spec.fields }, options: { ...(spec.unique ? { unique: true } : {}), ...(spec.sparse ? { sparse: true } : {}) } };
}

// Error classes, by name so that matching needs no driver import, whose
// meaning is "no server to talk to" rather than "this request was wrong".
const UNAVAILABLE_NAMES = new Set([
  'MongoNetworkError',
  'MongoNetworkTimeoutError',
  'MongoServerSelectionError',
  'MongooseServerSelectionError',
  'MongoTopologyClosedError',
  'MongoNotConnectedError',
  'MongoServerClosedError',
  'MongoClientClosedError',
  'MongoPoolClearedError',
  'PoolClearedOnNetworkError',
  'MongoPoolClosedError',
  'MongoWaitQueueTimeoutError',
  'MongoOperationTimeoutError',
  'MongoStalePrimaryError',
]);

// Server error codes meaning the node cannot serve writes now (step-down,
// shutdown, unreachable host); the driver's retryable set.
const UNAVAILABLE_CODES = new Set([6, 7, 89, 91, 134, 189, 262, 9001, 10107, 11600, 11602, 13435, 13436]);

const DUPLICATE_KEY_CODES = new Set([11000, 11001]);

/** Translates a driver error into the port's errors; anything else is returned unchanged. */
export function mapMongoError(error: unknown): unknown {
  if (error instanceof DuplicateKeyError || error instanceof StoreUnavailableError) return error;
  if (!isRecord(error)) return error;
  const message = typeof error.message === 'string' ? error.message : String(error);
  if (isDuplicateKey(error)) return new DuplicateKeyError(`duplicate key refused by a unique index: ${message}`);
  const name = typeof error.name === 'string' ? error.name : '';
  if (UNAVAILABLE_NAMES.has(name) || (typeof error.code === 'number' && UNAVAILABLE_CODES.has(error.code))) {
    return new StoreUnavailableError(
      `MongoDB is unavailable (${name || 'error'}: ${message}). Check that the server is running and reachable at the configured URL.`,
      { cause: error },
    );
  }
  return error;
}

function isDuplicateKey(error: Record<string, unknown>): boolean {
  if (typeof error.code === 'number' && DUPLICATE_KEY_CODES.has(error.code)) return true;
  // A bulk write reports per-operation errors, one object or an array of them.
  const writeErrors = error.writeErrors;
  const list: unknown[] = Array.isArray(writeErrors) ? writeErrors : writeErrors === undefined ? [] : [writeErrors];
  return list.some((e) => isRecord(e) && typeof e.code === 'number' && DUPLICATE_KEY_CODES.has(e.code));
}

/** Hides the password (or whole user info) of a connection URL before it appears in a message. */
export function redactUrl(url: string): string {
  return url.replace(/^([a-z][a-z0-9+.-]*:\/\/)[^@/]*@/i, '$1***@');
}

function connectError(url: string, error: unknown): Error {
  const name = isRecord(error) && typeof error.name === 'string' ? error.name : '';
  const message = error instanceof Error ? error.message : String(error);
  if (name === 'MongoParseError' || name === 'MongoInvalidArgumentError' || name === 'MongoAPIError') {
    return new Error(`invalid MongoDB URL ${redactUrl(url)}: ${message}`, { cause: error });
  }
  return new StoreUnavailableError(
    `cannot connect to MongoDB at ${redactUrl(url)} (${message}). Check that the server is running and the URL is right.`,
    { cause: error },
  );
}

/** A deep copy of document data, undefined fields dropped as `ignoreUndefined` does for stored ones. */
function copyValue<V>(value: V): V;
function copyValue(value: unknown): unknown {
  if (Object.prototype.toString.call(value) === '[object Date]') return new Date((value as Date).getTime());
  if (Array.isArray(value)) return value.map((item: unknown) => copyValue(item));
  if (isPlainObject(value)) {
    const copy: Record<string, unknown> = {};
    for (const [key, item] of Object.entries(value)) {
      if (item !== undefined) copy[key] = copyValue(item);
    }
    return copy;
  }
  return value;
}

/** Plain data only: BSON values (ObjectId, Decimal128...) are class instances and kept as they are. */
function isPlainObject(value: unknown): value is Record<string, unknown> {
  if (typeof value !== 'object' || value === null) return false;
  // Any realm's Object.prototype, not only this one's.
  const proto: unknown = Object.getPrototypeOf(value);
  return proto === null || Object.getPrototypeOf(proto) === null;
}

function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null;
}
