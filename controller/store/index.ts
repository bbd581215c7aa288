// The store component's public face: the port, and a way to open the backend
// the configuration asks for.

import path from 'node:path';
import { createNedbStore } from './nedb.js';
import type { Store } from './port.js';

export * from './port.js';
export { createNedbStore, type NedbStoreOptions } from './nedb.js';

export interface StoreConfig {
  /** When set, MongoDB is used; otherwise NeDB files under `<dataDir>/db`. */
  mongoUrl?: string;
  dataDir: string;
  /** Embedded mode only: keep nothing on disk. */
  inMemory?: boolean;
  /** Embedded mode only: datafile compaction period (default 10 minutes). */
  compactEveryMs?: number;
  /** Embedded mode only: failures of background compaction, e.g. to log them. */
  onBackgroundError?: (error: Error) => void;
}

const DEFAULT_COMPACT_EVERY_MS = 10 * 60_000;

export async function openStore(config: StoreConfig): Promise<Store> {
  if (config.mongoUrl) {
    // Loaded on demand so that the embedded default never loads mongoose.
    const { createMongoStore } = await import('./mongo.js');
    return createMongoStore(config.mongoUrl);
  }
  return createNedbStore({
    dir: path.join(config.dataDir, 'db'),
    inMemory: config.inMemory,
    compactEveryMs: config.compactEveryMs ?? DEFAULT_COMPACT_EVERY_MS,
    onBackgroundError: config.onBackgroundError,
  });
}
