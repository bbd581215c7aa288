// Each device's bundle history: one entry per (deployment, device), written
// once; a successful rollback marks the entry it replaced `rolled_back`.
import type { Logger } from 'pino';
import type { HistoryDoc, Repositories } from '../model.js';
import { present } from '../model.js';
import { DuplicateKeyError } from '../store/index.js';
import { notFound } from '../errors.js';

/** Statuses of an entry whose version once ran successfully on its device. */
export const SUCCEEDED_STATUSES: HistoryDoc['status'][] = ['success', 'rolled_back'];

export class HistoryService {
  constructor(private repos: Repositories, private logger: Logger) {}

  /**
   * Writes an entry once (its id is `${deployment_id}:${device_id}`), so a
   * duplicate report or a retry after a crash adds nothing. For a successful
   * rollback, the entry being replaced is the device's latest successful
   * entry of another version before it: what the device ran until the
   * rollback. It is chosen when the rollback's entry is first written and
   * stored with it, so a retry marks that same entry and never a second one.
   */
  async record(entry: HistoryDoc): Promise<void> {
    let stored: HistoryDoc = entry;
    if (entry.kind === 'rollback' && entry.status === 'success') {
      const replaced = await this.repos.bundleHistory.findOne(
        {
          device_id: entry.device_id, status: 'success', bundle_version: { $ne: entry.bundle_version },
          _id: { $ne: entry._id }, deployed_at: { $lte: entry.deployed_at },
        },
        { sort: { deployed_at: -1 } },
      );
      stored = { ...entry, replaced_entry_id: replaced?._id ?? null };
    }
    try {
      await this.repos.bundleHistory.insertOne(stored);
    } catch (err) {
      if (!(err instanceof DuplicateKeyError)) throw err;
      stored = (await this.repos.bundleHistory.findOne({ _id: entry._id })) ?? stored;
    }
    if (stored.replaced_entry_id) {
      const res = await this.repos.bundleHistory.updateOne(
        { _id: stored.replaced_entry_id, status: 'success' },
        { $set: { status: 'rolled_back', rolled_back_by: stored.deployment_id } },
      );
      if (res.modified) {
        this.logger.info({ deviceId: stored.device_id, entry: stored.replaced_entry_id, rollback: stored.deployment_id },
          'history entry marked rolled_back');
      }
    }
  }

  /**
   * Several entries at once (a timeout sweep over a whole deployment): one
   * insert for the plain ones, falling back to one at a time when some were
   * written before; a successful rollback's entry goes through `record`.
   */
  async recordMany(entries: HistoryDoc[]): Promise<void> {
    const plain = entries.filter((e) => !(e.kind === 'rollback' && e.status === 'success'));
    for (const e of entries) if (!plain.includes(e)) await this.record(e);
    if (plain.length > 1) {
      try {
        await this.repos.bundleHistory.insertMany(plain);
        return;
      } catch (err) {
        if (!(err instanceof DuplicateKeyError)) throw err;
      }
    }
    for (const e of plain) await this.record(e);
  }

  /** A device's entries, newest first. */
  async list(deviceId: string, limit: number): Promise<Record<string, unknown>[]> {
    const [entries, known] = await Promise.all([
      this.repos.bundleHistory.find({ device_id: deviceId }, { sort: { deployed_at: -1 }, limit }),
      this.repos.devices.count({ device_id: deviceId }),
    ]);
    if (!known && entries.length === 0) throw notFound(`device ${deviceId}`);
    return entries.map((e) => HistoryService.view(e));
  }

  /** Devices among `deviceIds` that never ran `version` successfully (one query). */
  async withoutSuccess(deviceIds: string[], version: string): Promise<string[]> {
    const found = await this.repos.bundleHistory.find({
      device_id: { $in: deviceIds }, bundle_version: version, status: { $in: SUCCEEDED_STATUSES },
    });
    const ok = new Set(found.map((e) => e.device_id));
    return deviceIds.filter((id) => !ok.has(id));
  }

  static view(e: HistoryDoc): Record<string, unknown> {
    return { ...present(e), replaced_entry_id: e.replaced_entry_id ?? null, rolled_back_by: e.rolled_back_by ?? null };
  }
}
