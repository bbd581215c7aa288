// The store port: one small collection interface that speaks a subset of
// MongoDB's query and update language. Repositories are written once against
// it; each backend (embedded NeDB, MongoDB via mongoose) is one small module.

/** Every stored document has a string `_id` chosen by the caller (a UUID). */
export interface StoredDocument {
  _id: string;
}

/**
 * A MongoDB-style filter: field equality, dotted paths, and the operators
 * `$in`, `$nin`, `$ne`, `$lt`, `$lte`, `$gt`, `$gte`, `$exists`, `$or`.
 * Values reaching a filter come from validated input only, never raw bodies.
 */
export type Filter = Record<string, unknown>;

/** A MongoDB-style update: `$set`, `$inc`, `$unset`, `$setOnInsert`, `$push`. */
export interface Update {
  $set?: Record<string, unknown>;
  $inc?: Record<string, number>;
  $unset?: Record<string, true | 1 | ''>;
  $setOnInsert?: Record<string, unknown>;
  $push?: Record<string, unknown>;
}

export type SortSpec = Record<string, 1 | -1>;

export interface FindOptions {
  sort?: SortSpec;
  limit?: number;
  skip?: number;
}

export interface UpdateOptions {
  upsert?: boolean;
}

export interface UpdateResult {
  matched: number;
  modified: number;
  upserted: boolean;
}

export interface BulkUpdate {
  filter: Filter;
  update: Update;
  upsert?: boolean;
}

export interface IndexSpec {
  fields: Record<string, 1 | -1>;
  unique?: boolean;
  /**
   * Documents without the field are left out of the index. For a field only a
   * few documents carry at a time (set, then unset): the index stays small,
   * and NeDB does not re-sort one huge bucket of "missing" on every update.
   */
  sparse?: boolean;
}

/** Raised by a backend when a unique index refuses a write. */
export class DuplicateKeyError extends Error {
  readonly code = 'duplicate_key';
  constructor(message: string) {
    super(message);
    this.name = 'DuplicateKeyError';
  }
}

/** Raised by a backend when the underlying engine cannot be reached or written. */
export class StoreUnavailableError extends Error {
  readonly code = 'store_unavailable';
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'StoreUnavailableError';
  }
}

export interface Collection<T extends StoredDocument> {
  insertOne(doc: T): Promise<T>;
  insertMany(docs: T[]): Promise<T[]>;
  findOne(filter: Filter, options?: FindOptions): Promise<T | null>;
  find(filter: Filter, options?: FindOptions): Promise<T[]>;
  count(filter: Filter): Promise<number>;
  updateOne(filter: Filter, update: Update, options?: UpdateOptions): Promise<UpdateResult>;
  updateMany(filter: Filter, update: Update): Promise<UpdateResult>;
  /** Atomically applies `update` to the first match and returns the document after the update. */
  findOneAndUpdate(filter: Filter, update: Update, options?: UpdateOptions): Promise<T | null>;
  deleteOne(filter: Filter): Promise<number>;
  deleteMany(filter: Filter): Promise<number>;
  /** Many independent single-document updates in one round trip where the engine allows it. */
  bulkUpdate(ops: BulkUpdate[]): Promise<void>;
  ensureIndex(spec: IndexSpec): Promise<void>;
}

export interface Store {
  collection<T extends StoredDocument>(name: string): Collection<T>;
  close(): Promise<void>;
}
