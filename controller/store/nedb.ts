// Embedded backend: one @seald-io/nedb datafile per collection, `<dir>/<name>.db`.
//
// NeDB speaks most of the port's language natively. Where it departs from
// MongoDB (which the repositories are written against) this module closes the
// gap, so that one contract suite holds for both backends:
//   - `$ne`/`$nin` against array fields, `null` matching a missing field and
//     `$exists` on an empty array are rewritten into queries NeDB gets right;
//   - upserts are built here: NeDB has no `$setOnInsert`, and its own upsert
//     turns `{ f: { $in: [...] } }` into a stored `{ f: {} }`;
//   - `modified` counts only documents that actually changed;
//   - NeDB's autocompaction timer rejects unhandled on a write error (which
//     would crash the process) and keeps the process alive; our own timer
//     reports failures and is unref'd;
//   - NeDB's copies share Date objects with its cache, so documents are
//     copied here on the way in and out;
//   - NeDB's loader does not handle read errors of the datafile (an uncaught
//     exception), so the file is checked before it is loaded.
//
//   - NeDB updates its in-memory cache before it appends to the file, so a
//     write that fails leaves the cache ahead of the disk; the collection is
//     then reloaded from its file before the next operation, and a failed
//     write is never seen by later reads;
//   - NeDB opens, appends to and closes the datafile for every write, and
//     never fsyncs. Here a write's lines are kept in memory and appended at the
//     next group commit: one open, one write and one fsync for every write that
//     completed meanwhile. A write resolves only once its lines are written and
//     synced, so an acknowledged write survives a SIGKILL and a power cut; if
//     the group's append fails, every write in it (and any buffered after it)
//     fails, and the collection reloads from its file.
//
// Limit that remains: one process per data directory (each collection lives
// in memory, the file is its append-only log).

import { randomUUID } from 'node:crypto';
import { constants as fsConstants } from 'node:fs';
import { access, mkdir, open, stat } from 'node:fs/promises';
import path from 'node:path';
import { isDeepStrictEqual } from 'node:util';
import { createRequire } from 'node:module';
import nedbModule from '@seald-io/nedb';
import {
  DuplicateKeyError,
  StoreUnavailableError,
  type BulkUpdate,
  type Collection,
  type Filter,
  type FindOptions,
  type IndexSpec,
  type SortSpec,
  type Store,
  type StoredDocument,
  type Update,
  type UpdateOptions,
  type UpdateResult,
} from './port.js';

export interface NedbStoreOptions {
  /** Directory holding one `<collection>.db` file per collection; created if missing. */
  dir?: string;
  /** Keep everything in memory (tests, throw-away runs); `dir` is then ignored. */
  inMemory?: boolean;
  /** Rewrite each loaded datafile this often; NeDB files are append-only and grow with every update. */
  compactEveryMs?: number;
  /** Failures of background compaction; there is no caller to throw them to. */
  onBackgroundError?: (error: StoreUnavailableError) => void;
  /** fsync the datafile before a write resolves (group commit). Default true. */
  syncWrites?: boolean;
}

type Query = Record<string, unknown>;

// The subset of NeDB used here. The package's typings declare an ES default
// export and loose `any` signatures, but it is CommonJS (`module.exports =
// Datastore`), so it is described here instead.
interface NedbCursor<R> extends PromiseLike<R> {
  sort(spec: SortSpec): NedbCursor<R>;
  skip(n: number): NedbCursor<R>;
  limit(n: number): NedbCursor<R>;
}

interface NedbDatastore {
  loadDatabaseAsync(): Promise<void>;
  insertAsync(docs: object): Promise<unknown>;
  findAsync(query: Query): NedbCursor<unknown[]>;
  countAsync(query: Query): NedbCursor<number>;
  updateAsync(
    query: Query,
    update: Query,
    options: { multi?: boolean; returnUpdatedDocs?: boolean },
  ): Promise<{ numAffected: number; affectedDocuments: unknown }>;
  removeAsync(query: Query, options: { multi: boolean }): Promise<number>;
  ensureIndexAsync(options: { fieldName: string | string[]; unique: boolean; sparse: boolean }): Promise<void>;
  compactDatafileAsync(): Promise<void>;
}

type NedbConstructor = new (options: { filename?: string; inMemoryOnly?: boolean }) => NedbDatastore;

const Datastore = nedbModule as unknown as NedbConstructor;

export async function createNedbStore(options: NedbStoreOptions): Promise<Store> {
  const inMemory = options.inMemory ?? false;
  const dir = options.dir;
  if (!inMemory) {
    if (!dir) throw new Error('createNedbStore: `dir` is required unless `inMemory` is set');
    await prepareDirectory(dir);
  }
  const compactEveryMs = options.compactEveryMs;
  if (compactEveryMs !== undefined && !(Number.isFinite(compactEveryMs) && compactEveryMs > 0)) {
    throw new Error(`createNedbStore: compactEveryMs must be a positive number of milliseconds, got ${compactEveryMs}`);
  }

  const engines = new Map<string, CollectionEngine>();
  let closed = false;
  const isClosed = (): boolean => closed;

  let timer: NodeJS.Timeout | undefined;
  if (!inMemory && compactEveryMs !== undefined) {
    timer = setInterval(() => {
      for (const engine of engines.values()) {
        engine.compact().catch((error: unknown) => options.onBackgroundError?.(asUnavailable(error, engine.label)));
      }
    }, compactEveryMs);
    // Compaction is housekeeping: it must never be what keeps the process running.
    timer.unref();
  }

  return {
    collection<T extends StoredDocument>(name: string): Collection<T> {
      let engine = engines.get(name);
      if (!engine) {
        checkCollectionName(name);
        const filename = inMemory || !dir ? undefined : path.join(dir, `${name}.db`);
        engine = new CollectionEngine(name, filename, isClosed, options.syncWrites ?? true);
        engines.set(name, engine);
      }
      return new NedbCollection<T>(engine);
    },

    async close(): Promise<void> {
      if (closed) return;
      closed = true;
      clearInterval(timer);
      const outcomes = await Promise.allSettled([...engines.values()].map((engine) => engine.flush()));
      const failure = outcomes.find((o): o is PromiseRejectedResult => o.status === 'rejected');
      if (failure) throw failure.reason;
    },
  };
}

/** Owns one collection's datastore: lazy loading, write serialisation, compaction. */
class CollectionEngine {
  readonly label: string;
  private loading: Promise<NedbDatastore> | undefined;
  private loaded: NedbDatastore | undefined;
  private tail: Promise<unknown> = Promise.resolve();
  private compaction: Promise<void> | undefined;
  /** The group commit under way, and the one queued to start after it. */
  private syncing: Promise<void> | undefined;
  private nextSync: Promise<void> | undefined;
  /** Serialized lines of completed writes, not yet in the datafile. */
  private appends: string[] = [];
  /** Bumped whenever buffered lines are dropped: a write from an older epoch was lost. */
  private epoch = 0;

  constructor(
    readonly name: string,
    private readonly filename: string | undefined,
    private readonly isClosed: () => boolean,
    private readonly syncWrites: boolean,
  ) {
    this.label = filename ? `collection "${name}" (${filename})` : `in-memory collection "${name}"`;
  }

  read<R>(op: (db: NedbDatastore) => PromiseLike<R>): Promise<R> {
    if (this.isClosed()) return Promise.reject(this.closedError());
    return this.run(op);
  }

  /**
   * Writes run one after another. NeDB serialises its own operations too, but
   * an upsert here is "find, then insert or update", and no other write may
   * slip in between. Reads need no such guarantee and are not queued.
   */
  write<R>(op: (db: NedbDatastore) => PromiseLike<R>): Promise<R> {
    if (this.isClosed()) return Promise.reject(this.closedError());
    const result = this.tail.then(() => this.runWrite(op));
    this.tail = result.catch(() => undefined);
    if (!this.filename) return result.then(({ value }) => value);
    // The commit happens outside the queue, so writes completing meanwhile share it.
    return result.then(async ({ value, epoch }) => {
      await this.durable();
      if (epoch !== this.epoch) {
        throw new StoreUnavailableError(`${this.label}: the write could not be stored (an append to the datafile failed)`);
      }
      return value;
    });
  }

  private async runWrite<R>(op: (db: NedbDatastore) => PromiseLike<R>): Promise<{ value: R; epoch: number }> {
    const db = await this.load();
    try {
      const value = await op(db);
      // Taken as the op's lines are buffered: a failed commit after this moment bumps it.
      return { value, epoch: this.epoch };
    } catch (error) {
      const mapped = mapError(error, this.label);
      if (mapped instanceof StoreUnavailableError) this.forget(db);
      throw mapped;
    }
  }

  /** The cache may hold what the file does not: reload from the file before the next operation. */
  private forget(db: NedbDatastore): void {
    if (this.loaded !== db) return;
    this.loaded = undefined;
    this.loading = undefined;
  }

  /** Resolves once an fsync that started after this call has completed. */
  private durable(): Promise<void> {
    if (this.nextSync) return this.nextSync;
    const next = (this.syncing ?? Promise.resolve()).catch(() => undefined).then(() => {
      this.nextSync = undefined;
      const run = this.fsync();
      this.syncing = run;
      return run.finally(() => {
        if (this.syncing === run) this.syncing = undefined;
      });
    });
    this.nextSync = next;
    return next;
  }

  /** Appends the buffered lines in one write, then fsyncs (group commit). */
  private async fsync(): Promise<void> {
    if (this.appends.length === 0) return;
    const db = this.loaded;
    const text = this.appends.join('');
    this.appends = [];
    try {
      const handle = await open(this.filename!, 'a', 0o644);
      try {
        await handle.writeFile(text, 'utf8');
        if (this.syncWrites) await handle.datasync();
      } finally {
        await handle.close();
      }
    } catch (error) {
      // What reached the disk is unknown: drop what is buffered, fail those
      // writes, and start again from what the file holds.
      this.appends = [];
      this.epoch++;
      if (db) this.forget(db);
      throw asUnavailable(error, this.label);
    }
  }

  /** Lines of a write on `db`, appended at the next commit (instead of NeDB's open-append-close per write). */
  private buffer(db: NedbDatastore, docs: StoredDocument[]): void {
    // A write still running on an instance already given up must not reach the file the next one loaded.
    if (this.loaded !== db) throw new StoreUnavailableError(`${this.label}: reloading after a failed write`);
    let text = '';
    for (const doc of docs) text += `${nedbModel.serialize(doc)}\n`;
    if (text) this.appends.push(text);
  }

  compact(): Promise<void> {
    const db = this.loaded;
    if (!db || !this.filename) return Promise.resolve();
    this.compaction ??= db
      .compactDatafileAsync()
      .catch((error: unknown) => {
        throw asUnavailable(error, this.label);
      })
      .finally(() => {
        this.compaction = undefined;
      });
    return this.compaction;
  }

  /** Lets queued writes finish, then rewrites the datafile (NeDB fsyncs a compaction). */
  async flush(): Promise<void> {
    await this.tail;
    await this.syncing?.catch(() => undefined);
    await this.nextSync?.catch(() => undefined);
    await this.durable().catch(() => undefined);
    await this.compaction?.catch(() => undefined);
    await this.compact();
  }

  private async run<R>(op: (db: NedbDatastore) => PromiseLike<R>): Promise<R> {
    const db = await this.load();
    try {
      return await op(db);
    } catch (error) {
      throw mapError(error, this.label);
    }
  }

  private load(): Promise<NedbDatastore> {
    if (!this.loading) {
      const filename = this.filename;
      const db = new Datastore(filename ? { filename } : { inMemoryOnly: true });
      if (filename) {
        (db as unknown as NedbInternals).persistence.persistNewStateAsync = async (docs) => this.buffer(db, docs);
      }
      const ready = filename ? checkDatafile(filename) : Promise.resolve();
      this.loading = ready.then(() => db.loadDatabaseAsync()).then(
        () => {
          this.loaded = db;
          return db;
        },
        (error: unknown) => {
          // A failed load leaves NeDB's executor buffering forever: forget this
          // instance so that the next operation retries with a fresh one.
          this.loading = undefined;
          throw new StoreUnavailableError(
            `${this.label}: cannot load the datafile (${explain(error)}). ` +
              'Check that the data directory exists, is writable and the file is not corrupt.',
            { cause: error },
          );
        },
      );
    }
    return this.loading;
  }

  private closedError(): StoreUnavailableError {
    return new StoreUnavailableError(`${this.label}: the store is closed`);
  }
}

class NedbCollection<T extends StoredDocument> implements Collection<T> {
  constructor(private readonly engine: CollectionEngine) {}

  async insertOne(doc: T): Promise<T> {
    const copy = copyValue(doc);
    return this.engine.write(async (db) => copyValue(await db.insertAsync(copy)) as T);
  }

  async insertMany(docs: T[]): Promise<T[]> {
    if (docs.length === 0) return [];
    // NeDB inserts an array all-or-nothing (MongoDB's ordered insertMany keeps
    // the documents before a failure); callers must not rely on either.
    const copies = copyValue(docs);
    return this.engine.write(async (db) => copyValue(await db.insertAsync(copies)) as T[]);
  }

  async findOne(filter: Filter, options: FindOptions = {}): Promise<T | null> {
    const query = toNedbQuery(filter);
    const [doc] = await this.engine.read((db) => withOptions(db.findAsync(query), { ...options, limit: 1 }));
    return doc === undefined ? null : (copyValue(doc) as T);
  }

  async find(filter: Filter, options: FindOptions = {}): Promise<T[]> {
    const query = toNedbQuery(filter);
    return copyValue(await this.engine.read((db) => withOptions(db.findAsync(query), options))) as T[];
  }

  async count(filter: Filter): Promise<number> {
    const query = toNedbQuery(filter);
    return this.engine.read((db) => db.countAsync(query));
  }

  async updateOne(filter: Filter, update: Update, options: UpdateOptions = {}): Promise<UpdateResult> {
    checkUpdate(update);
    const outcome = await this.engine.write((db) => updateFirst(db, filter, update, options.upsert ?? false));
    return outcome.result;
  }

  async updateMany(filter: Filter, update: Update): Promise<UpdateResult> {
    checkUpdate(update);
    return this.engine.write((db) => updateAll(db, filter, update));
  }

  async findOneAndUpdate(filter: Filter, update: Update, options: UpdateOptions = {}): Promise<T | null> {
    checkUpdate(update);
    const outcome = await this.engine.write((db) => updateFirst(db, filter, update, options.upsert ?? false));
    return outcome.doc === null ? null : (copyValue(outcome.doc) as T);
  }

  async deleteOne(filter: Filter): Promise<number> {
    const query = toNedbQuery(filter);
    return this.engine.write((db) => db.removeAsync(query, { multi: false }));
  }

  async deleteMany(filter: Filter): Promise<number> {
    const query = toNedbQuery(filter);
    return this.engine.write((db) => db.removeAsync(query, { multi: true }));
  }

  async bulkUpdate(ops: BulkUpdate[]): Promise<void> {
    for (const op of ops) checkUpdate(op.update);
    if (ops.length === 0) return;
    // The heartbeat flush: thousands of updates, one per device. Applied as
    // one NeDB task they cost one append to the datafile instead of one
    // file open/append/close each.
    let rest = ops;
    if (batchable(ops)) {
      // In slices, so that other work (MQTT traffic) runs between them.
      while (rest.length > 0) {
        const slice = rest.slice(0, BATCH_SLICE);
        if (!(await this.engine.write((db) => updateBatch(db, slice)))) break;
        rest = rest.slice(BATCH_SLICE);
      }
      if (rest.length === 0) return;
    }
    // NeDB has no bulk operation. All updates are queued at once (they still
    // apply one at a time, in order) and, like MongoDB's unordered bulkWrite,
    // every one is attempted before the first failure is reported.
    const outcomes = await Promise.allSettled(
      rest.map((op) =>
        this.engine.write(async (db) => {
          if (op.upsert) await updateFirst(db, op.filter, op.update, true);
          else await updateFirstBlind(db, op.filter, op.update);
        }),
      ),
    );
    const failure = outcomes.find((o): o is PromiseRejectedResult => o.status === 'rejected');
    if (failure) throw failure.reason;
  }

  async ensureIndex(spec: IndexSpec): Promise<void> {
    const fields = Object.keys(spec.fields);
    if (fields.length === 0) throw new Error('ensureIndex: an index needs at least one field');
    // NeDB indexes have no direction; sort order does not depend on them.
    const unique = spec.unique ?? false;
    const sparse = spec.sparse ?? false;
    if (fields.length === 1) {
      await this.engine.write((db) => db.ensureIndexAsync({ fieldName: fields[0]!, unique, sparse }));
      return;
    }
    // NeDB consults a compound index only when the query gives every one of
    // its fields by equality, and never for a prefix as MongoDB does: a
    // deployment's states by deployment_id, or a device's pending ones by
    // device_id and a $in of statuses, scanned the whole collection. The
    // first field gets its own index (what MongoDB would use the prefix
    // for); the compound one is kept only to enforce uniqueness.
    await this.engine.write((db) => db.ensureIndexAsync({ fieldName: fields[0]!, unique: false, sparse }));
    if (unique) await this.engine.write((db) => db.ensureIndexAsync({ fieldName: fields, unique: true, sparse }));
  }
}

// ---------------------------------------------------------------- updates --

interface UpdateOutcome {
  result: UpdateResult;
  doc: StoredDocument | null;
}

const UPDATE_OPERATORS = ['$set', '$inc', '$unset', '$setOnInsert', '$push'];

/** NeDB would treat an operator-less update as a whole-document replacement. */
function checkUpdate(update: Update): void {
  const keys = Object.keys(update);
  if (keys.length === 0) throw new Error(`an update needs at least one of ${UPDATE_OPERATORS.join(', ')}`);
  for (const key of keys) {
    if (!UPDATE_OPERATORS.includes(key)) {
      throw new Error(`unsupported update operator "${key}": use ${UPDATE_OPERATORS.join(', ')}`);
    }
  }
}

/**
 * The update as NeDB should apply it to an existing document: without
 * `$setOnInsert` (MongoDB ignores it then), and copied because NeDB stores
 * `$set`/`$push` values by reference. Undefined when nothing is left.
 */
function modifiersForExisting(update: Update): Query | undefined {
  const modifiers: Query = {};
  for (const [op, fields] of Object.entries(update)) {
    if (op !== '$setOnInsert' && fields !== undefined) modifiers[op] = fields;
  }
  return Object.keys(modifiers).length > 0 ? copyValue(modifiers) : undefined;
}

async function updateFirst(db: NedbDatastore, filter: Filter, update: Update, upsert: boolean): Promise<UpdateOutcome> {
  const [before] = (await db.findAsync(toNedbQuery(filter)).limit(1)) as StoredDocument[];
  if (!before) {
    if (!upsert) return { result: { matched: 0, modified: 0, upserted: false }, doc: null };
    const inserted = (await db.insertAsync(copyValue(buildUpsertDocument(filter, update)))) as StoredDocument;
    return { result: { matched: 0, modified: 0, upserted: true }, doc: inserted };
  }
  const modifiers = modifiersForExisting(update);
  if (!modifiers) return { result: { matched: 1, modified: 0, upserted: false }, doc: before };
  const after = await updateById(db, before._id, modifiers);
  if (!after) return { result: { matched: 0, modified: 0, upserted: false }, doc: null };
  return { result: { matched: 1, modified: isDeepStrictEqual(before, after) ? 0 : 1, upserted: false }, doc: after };
}

/**
 * One document's update, as NeDB's own update does it, but without taking the
 * document out of every index and putting it back when no indexed field
 * changes. NeDB keeps the documents sharing an index key in an array, and
 * taking one out copies the array: with every online device under one key of
 * the presence index, each device update cost O(fleet). Resolves the document
 * after the update (a copy), or null if it is gone.
 */
async function updateById(db: NedbDatastore, id: string, modifiers: Query): Promise<StoredDocument | null> {
  const internal = db as unknown as NedbInternals;
  return internal.executor.pushAsync(async () => {
    const [oldDoc] = (await internal._getCandidatesAsync({ _id: id })).filter((doc) => doc._id === id);
    if (!oldDoc) return null;
    const newDoc = nedbModel.modify(oldDoc, modifiers);
    replaceIndexed(internal, [{ oldDoc, newDoc }]);
    await internal.persistence.persistNewStateAsync([newDoc]);
    return copyValue(newDoc);
  });
}

/**
 * Puts new versions of documents in place of the old: through NeDB's index
 * update (all or nothing; throws on a unique index refusing it) for those
 * whose indexed fields change, in place for the others (the indexes keep
 * pointing at the same object; NeDB hands out copies only).
 */
function replaceIndexed(internal: NedbInternals, modifications: Array<{ oldDoc: StoredDocument; newDoc: StoredDocument }>): void {
  const indexed = Object.keys(internal.indexes).flatMap((name) => name.split(','));
  const keepsKeys = (m: { oldDoc: StoredDocument; newDoc: StoredDocument }) =>
    indexed.every((f) => nedbModel.compareThings(nedbModel.getDotValue(m.oldDoc, f), nedbModel.getDotValue(m.newDoc, f)) === 0);
  const reindex = new Set(modifications.filter((m) => !keepsKeys(m)));
  if (reindex.size > 0) internal._updateIndexes([...reindex]);
  for (const m of modifications) {
    if (reindex.has(m)) continue;
    const target = m.oldDoc as unknown as Record<string, unknown>;
    for (const key of Object.keys(target)) if (!(key in m.newDoc)) delete target[key];
    Object.assign(target, m.newDoc);
  }
}

/**
 * Whether a bulk update can run as one batch with the same outcome as one
 * update after another: no upserts, and filters of plain equalities on
 * fields no update in the batch changes (so no update can change which
 * document a later one matches). updateBatch also requires every operation
 * to hit a different document.
 */
function batchable(ops: BulkUpdate[]): boolean {
  const filtered = new Set<string>();
  const updated = new Set<string>();
  for (const op of ops) {
    if (op.upsert) return false;
    for (const [key, value] of Object.entries(op.filter)) {
      if (key.startsWith('$') || value === null || isPlainObject(value) || Array.isArray(value)) return false;
      filtered.add(key);
    }
    for (const [operator, fields] of Object.entries(op.update)) {
      if (operator === '$setOnInsert' || !isPlainObject(fields)) continue;
      for (const field of Object.keys(fields)) updated.add(field.split('.')[0]!);
    }
  }
  for (const field of filtered) if (updated.has(field)) return false;
  return true;
}

// The parts of NeDB's own update path (Datastore#_updateAsync) a batch uses:
// find the candidates, compute the new documents, swap them into the indexes
// (all or nothing), then append them to the datafile in one write. Run as one
// task on NeDB's executor, so compaction cannot interleave.
interface NedbInternals {
  indexes: Record<string, unknown>;
  executor: { pushAsync<R>(task: () => Promise<R>): Promise<R> };
  _getCandidatesAsync(query: Query): Promise<StoredDocument[]>;
  _updateIndexes(modifications: Array<{ oldDoc: StoredDocument; newDoc: StoredDocument }>): void;
  persistence: { persistNewStateAsync(docs: StoredDocument[]): Promise<void> };
}

interface NedbModel {
  serialize(doc: unknown): string;
  match(doc: unknown, query: Query): boolean;
  modify(doc: unknown, update: Query): StoredDocument;
  getDotValue(doc: unknown, field: string): unknown;
  compareThings(a: unknown, b: unknown): number;
}

/** Operations per NeDB task in a batched bulk update. */
const BATCH_SLICE = 2000;

// NeDB's document model (match, modify), which its package exports no types for.
const nedbModel = createRequire(import.meta.url)('@seald-io/nedb/lib/model.js') as NedbModel;

/**
 * Applies every operation in one NeDB task. Resolves false, having changed
 * nothing, when the batch cannot be applied as a whole (two operations on one
 * document, an invalid modification, a unique index refusing it): the caller
 * then applies the operations one by one, with their individual outcomes.
 */
async function updateBatch(db: NedbDatastore, ops: BulkUpdate[]): Promise<boolean> {
  const internal = db as unknown as NedbInternals;
  return internal.executor.pushAsync(async () => {
    const modifications: Array<{ oldDoc: StoredDocument; newDoc: StoredDocument }> = [];
    const touched = new Set<string>();
    for (const op of ops) {
      const modifiers = modifiersForExisting(op.update);
      if (!modifiers) continue;
      const query = toNedbQuery(op.filter);
      const candidates = await internal._getCandidatesAsync(query);
      const oldDoc = candidates.find((doc) => nedbModel.match(doc, query));
      if (!oldDoc) continue;
      if (touched.has(oldDoc._id)) return false;
      touched.add(oldDoc._id);
      try {
        modifications.push({ oldDoc, newDoc: nedbModel.modify(oldDoc, modifiers) });
      } catch {
        return false;
      }
    }
    if (modifications.length === 0) return true;
    // A heartbeat changes no indexed field: re-indexing every document was most of the cost of a flush.
    try {
      replaceIndexed(internal, modifications);
    } catch {
      return false; // NeDB rolled the indexes back
    }
    await internal.persistence.persistNewStateAsync(modifications.map((m) => m.newDoc));
    return true;
  });
}

/** For bulk updates, which report nothing back: one NeDB call instead of a find and an update. */
async function updateFirstBlind(db: NedbDatastore, filter: Filter, update: Update): Promise<void> {
  const modifiers = modifiersForExisting(update);
  if (modifiers) await db.updateAsync(toNedbQuery(filter), modifiers, {});
}

async function updateAll(db: NedbDatastore, filter: Filter, update: Update): Promise<UpdateResult> {
  const query = toNedbQuery(filter);
  const before = (await db.findAsync(query)) as StoredDocument[];
  const modifiers = modifiersForExisting(update);
  if (!modifiers || before.length === 0) return { matched: before.length, modified: 0, upserted: false };
  const { affectedDocuments } = await db.updateAsync(query, modifiers, { multi: true, returnUpdatedDocs: true });
  const previous = new Map(before.map((doc) => [doc._id, doc]));
  let modified = 0;
  for (const doc of affectedDocuments as StoredDocument[]) {
    if (!isDeepStrictEqual(previous.get(doc._id), doc)) modified += 1;
  }
  return { matched: before.length, modified, upserted: false };
}

/**
 * The document an upsert inserts, as MongoDB builds it: the filter's equality
 * fields (operator conditions other than `$eq` are not copied), then the
 * update with `$setOnInsert` applied like `$set`; a UUID `_id` if none given.
 */
function buildUpsertDocument(filter: Filter, update: Update): Record<string, unknown> {
  const doc: Record<string, unknown> = {};
  seedFromFilter(doc, filter);
  for (const [op, fields] of Object.entries(update)) {
    if (!isPlainObject(fields)) continue;
    for (const [field, value] of Object.entries(fields)) applyOnInsert(doc, op, field, value);
  }
  if (doc._id === undefined) doc._id = randomUUID();
  return doc;
}

function seedFromFilter(doc: Record<string, unknown>, filter: Filter): void {
  for (const [key, value] of Object.entries(filter)) {
    if (key === '$and' && Array.isArray(value)) {
      for (const part of value) if (isPlainObject(part)) seedFromFilter(doc, part);
    } else if (key.startsWith('$')) {
      continue;
    } else if (isOperatorObject(value)) {
      if ('$eq' in value) setPath(doc, key, value.$eq);
    } else {
      setPath(doc, key, value);
    }
  }
}

function applyOnInsert(doc: Record<string, unknown>, op: string, field: string, value: unknown): void {
  switch (op) {
    case '$set':
    case '$setOnInsert':
      setPath(doc, field, value);
      return;
    case '$unset':
      unsetPath(doc, field);
      return;
    case '$inc': {
      const current = getPath(doc, field);
      if (typeof value !== 'number') throw new Error(`$inc of "${field}" needs a number`);
      if (current === undefined) setPath(doc, field, value);
      else if (typeof current === 'number') setPath(doc, field, current + value);
      else throw new Error(`cannot $inc non-numeric field "${field}"`);
      return;
    }
    case '$push': {
      let list = getPath(doc, field);
      if (list === undefined) {
        list = [];
        setPath(doc, field, list);
      }
      if (!Array.isArray(list)) throw new Error(`cannot $push to non-array field "${field}"`);
      if (isPlainObject(value) && '$each' in value) {
        if (!Array.isArray(value.$each)) throw new Error(`$push $each of "${field}" needs an array`);
        list.push(...value.$each);
      } else {
        list.push(value);
      }
      return;
    }
    default:
      throw new Error(`unsupported update operator "${op}"`);
  }
}

function pathParts(field: string): string[] {
  const parts = field.split('.');
  if (parts.some((part) => part === '' || part === '__proto__' || part === 'constructor' || part === 'prototype')) {
    throw new Error(`invalid field path "${field}"`);
  }
  return parts;
}

function getPath(doc: Record<string, unknown>, field: string): unknown {
  let current: unknown = doc;
  for (const part of pathParts(field)) {
    if (!isPlainObject(current)) return undefined;
    current = current[part];
  }
  return current;
}

function setPath(doc: Record<string, unknown>, field: string, value: unknown): void {
  const parts = pathParts(field);
  let current = doc;
  for (const part of parts.slice(0, -1)) {
    const next = current[part] ?? {};
    if (!isPlainObject(next)) throw new Error(`cannot set "${field}": "${part}" is not an object`);
    current[part] = next;
    current = next;
  }
  current[parts[parts.length - 1]] = value;
}

function unsetPath(doc: Record<string, unknown>, field: string): void {
  const parts = pathParts(field);
  const parent = parts.length === 1 ? doc : getPath(doc, parts.slice(0, -1).join('.'));
  if (isPlainObject(parent)) delete parent[parts[parts.length - 1]];
}

// ---------------------------------------------------------------- filters --

/**
 * Translates a port filter into a NeDB query with MongoDB's semantics. Plain
 * equality and range conditions stay top-level so that NeDB can use indexes;
 * rewritten conditions go into a top-level `$and`.
 */
function toNedbQuery(filter: Filter): Query {
  const query: Query = {};
  const extra: Query[] = [];
  for (const [key, value] of Object.entries(filter)) {
    if (key === '$or' || key === '$and') {
      if (!Array.isArray(value) || !value.every(isPlainObject)) throw new Error(`${key} needs an array of filters`);
      const parts = value.map(toNedbQuery);
      if (key === '$or') query.$or = parts;
      else extra.push(...parts);
    } else if (key.startsWith('$')) {
      throw new Error(`unsupported filter operator "${key}"`);
    } else if (value === null) {
      extra.push(matchesNull(key));
    } else if (isOperatorObject(value)) {
      const kept: Query = {};
      for (const [op, arg] of Object.entries(value)) {
        switch (op) {
          case '$eq':
            extra.push(equals(key, arg));
            break;
          case '$ne':
            // NeDB tests `$ne` element by element on arrays; MongoDB requires no element to be equal.
            extra.push({ $not: equals(key, arg) });
            break;
          case '$in': {
            const list = asList(key, op, arg);
            if (isLargePrimitiveList(list)) extra.push(inSet(key, list));
            else if (list.includes(null)) extra.push(inList(key, list));
            else kept.$in = list;
            break;
          }
          case '$nin': {
            const list = asList(key, op, arg);
            extra.push({ $not: isLargePrimitiveList(list) ? inSet(key, list) : inList(key, list) });
            break;
          }
          case '$exists':
            // NeDB sees no value in an empty array, MongoDB sees an existing field.
            if (arg) extra.push({ $or: [{ [key]: { $exists: true } }, { [key]: { $size: 0 } }] });
            else kept.$exists = false;
            break;
          case '$lt':
          case '$lte':
          case '$gt':
          case '$gte':
            kept[op] = arg;
            break;
          default:
            throw new Error(`unsupported filter operator "${op}" on "${key}"`);
        }
      }
      if (Object.keys(kept).length > 0) query[key] = kept;
    } else {
      query[key] = value;
    }
  }
  if (extra.length > 0) query.$and = extra;
  return query;
}

function equals(key: string, value: unknown): Query {
  return value === null ? matchesNull(key) : { [key]: value };
}

/** MongoDB's `{ f: null }` also matches documents without `f`; NeDB's does not. */
function matchesNull(key: string): Query {
  return { $or: [{ [key]: null }, { [key]: { $exists: false } }] };
}

function inList(key: string, list: unknown[]): Query {
  const values = list.filter((v) => v !== null);
  const byValue: Query = { [key]: { $in: values } };
  return values.length === list.length ? byValue : { $or: [byValue, matchesNull(key)] };
}

// NeDB tests `$in` by comparing with each element of the list, for every
// candidate: O(documents × list). A deployment to 10,000 devices asks
// whether 10,000 ids exist (0.4 s). Past this size, a Set answers instead,
// in one pass over the collection (which a short list through the index beats).
const LARGE_IN = 256;

function isLargePrimitiveList(list: unknown[]): boolean {
  return list.length > LARGE_IN && list.every((v) => typeof v === 'string' || typeof v === 'number' || typeof v === 'boolean');
}

/** `key` equals one of `list` (an array field: one of its elements does), as one pass over the documents. */
function inSet(key: string, list: unknown[]): Query {
  const set = new Set(list);
  return {
    $where(this: Record<string, unknown>): boolean {
      const value = getPath(this, key);
      return Array.isArray(value) ? value.some((v) => set.has(v)) : set.has(value);
    },
  };
}

function asList(key: string, op: string, arg: unknown): unknown[] {
  if (!Array.isArray(arg)) throw new Error(`${op} on "${key}" needs an array`);
  return arg;
}

function isPlainObject(value: unknown): value is Record<string, unknown> {
  if (typeof value !== 'object' || value === null) return false;
  // Any realm's Object.prototype (vm contexts, jest), not only this one's.
  const proto: unknown = Object.getPrototypeOf(value);
  return proto === null || Object.getPrototypeOf(proto) === null;
}

function isDate(value: unknown): value is Date {
  return Object.prototype.toString.call(value) === '[object Date]';
}

/** A deep copy of document data. Undefined fields are dropped, as MongoDB's driver is told to. */
function copyValue<V>(value: V): V;
function copyValue(value: unknown): unknown {
  if (isDate(value)) return new Date(value.getTime());
  if (Array.isArray(value)) return value.map((item: unknown) => copyValue(item));
  if (isPlainObject(value)) {
    const copy: Record<string, unknown> = {};
    for (const [key, item] of Object.entries(value)) if (item !== undefined) copy[key] = copyValue(item);
    return copy;
  }
  return value;
}

/** `{ $gt: 1 }` is a condition; `{ a: 1 }` (a sub-document to compare whole) is not. */
function isOperatorObject(value: unknown): value is Record<string, unknown> {
  if (!isPlainObject(value)) return false;
  const keys = Object.keys(value);
  return keys.length > 0 && keys.every((k) => k.startsWith('$'));
}

function withOptions<R>(cursor: NedbCursor<R>, options: FindOptions): NedbCursor<R> {
  let result = cursor;
  if (options.sort && Object.keys(options.sort).length > 0) result = result.sort(options.sort);
  if (options.skip) result = result.skip(options.skip);
  if (options.limit) result = result.limit(options.limit);
  return result;
}

// ----------------------------------------------------------------- errors --

// Errors of a datafile or its directory that the operator has to fix.
const UNAVAILABLE_CODES = new Set([
  'EACCES', 'EPERM', 'EROFS', 'ENOSPC', 'EDQUOT', 'ENOENT', 'ENOTDIR', 'EISDIR',
  'EEXIST', 'EIO', 'EMFILE', 'ENFILE', 'EBUSY', 'ENAMETOOLONG', 'ELOOP', 'EXDEV',
]);

function mapError(error: unknown, label: string): unknown {
  if (error instanceof DuplicateKeyError || error instanceof StoreUnavailableError) return error;
  if (isRecord(error) && error.errorType === 'uniqueViolated') {
    return new DuplicateKeyError(`${label}: duplicate key ${JSON.stringify(error.key)} refused by a unique index`);
  }
  const code = errnoCode(error);
  if (code && UNAVAILABLE_CODES.has(code)) return asUnavailable(error, label);
  return error;
}

function asUnavailable(error: unknown, label: string): StoreUnavailableError {
  if (error instanceof StoreUnavailableError) return error;
  return new StoreUnavailableError(
    `${label}: cannot write the datafile (${explain(error)}). ` +
      'Check that the data directory exists, is a writable directory and the disk has free space.',
    { cause: error },
  );
}

async function prepareDirectory(dir: string): Promise<void> {
  try {
    await mkdir(dir, { recursive: true });
    await access(dir, fsConstants.W_OK);
  } catch (error) {
    throw new StoreUnavailableError(
      `NeDB data directory ${dir} is not usable (${explain(error)}). Point the data directory at a writable folder.`,
      { cause: error },
    );
  }
}

/** Read errors during a NeDB load escape as uncaught exceptions: find them first. */
async function checkDatafile(filename: string): Promise<void> {
  let info;
  try {
    info = await stat(filename);
  } catch (error) {
    if (errnoCode(error) === 'ENOENT') return; // NeDB creates it
    throw error;
  }
  if (!info.isFile()) {
    throw Object.assign(new Error(`${filename} exists but is not a regular file`), { code: 'EISDIR' });
  }
  await access(filename, fsConstants.R_OK | fsConstants.W_OK);
}

function checkCollectionName(name: string): void {
  // The name becomes a file name: keep it to one plain path segment.
  if (!/^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$/.test(name)) {
    throw new Error(`invalid collection name "${name}": use letters, digits, "_", "-" and "."`);
  }
}

function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null;
}

function errnoCode(error: unknown): string | undefined {
  return isRecord(error) && typeof error.code === 'string' ? error.code : undefined;
}

function explain(error: unknown): string {
  const code = errnoCode(error);
  const message = error instanceof Error ? error.message : String(error);
  return code && !message.startsWith(code) ? `${code}: ${message}` : message;
}
