// Bundles: the upload (stored while hashed and validated in one pass), the
// catalogue, and the bytes for download.
import { randomUUID } from 'node:crypto';
import { PassThrough, type Readable } from 'node:stream';
import type { Logger } from 'pino';
import semver from 'semver';
import type { BundleDoc, Repositories } from '../model.js';
import { now, present } from '../model.js';
import type { BlobStore, ByteRange } from '../blobs/index.js';
import { BlobTooLargeError } from '../blobs/index.js';
import { DuplicateKeyError } from '../store/index.js';
import { ApiError, conflict, notFound } from '../errors.js';
import { manifestSink } from './manifest-reader.js';

export class BundleService {
  constructor(
    private repos: Repositories,
    private blobs: BlobStore,
    private logger: Logger,
    private maxBytes: number,
  ) {}

  /** Stores an uploaded archive; refuses (storing nothing) an invalid or duplicate bundle. */
  async upload(source: Readable, filename: string, extra: { signature?: string | null } = {}): Promise<BundleDoc> {
    const id = randomUUID();
    const toBlob = new PassThrough();
    const { sink, manifest } = manifestSink();
    source.pipe(toBlob);
    source.pipe(sink);
    source.on('error', (err) => toBlob.destroy(err));

    // The blob is complete once the source has ended, and by then the sink has
    // seen every byte too, so the manifest verdict follows without a wait.
    let info;
    try {
      info = await this.blobs.put(id, toBlob, { maxBytes: this.maxBytes });
    } catch (err) {
      source.unpipe();
      source.resume();
      if (err instanceof BlobTooLargeError) {
        // The rest of the upload is not read: the answer closes the connection.
        throw new ApiError(413, 'bundle_too_large', `bundle exceeds the limit of ${this.maxBytes} bytes`);
      }
      throw err;
    }
    let m;
    try {
      m = await manifest;
    } catch (err) {
      await this.blobs.delete(id).catch(() => {});
      throw err;
    }
    const doc: BundleDoc = {
      _id: id, name: m.name ?? null, version: m.version, sha256: info.sha256, size: info.size,
      filename, manifest: m, model_name: m.model?.name ?? null, signature: extra.signature ?? null, created_at: now(),
    };
    try {
      await this.repos.bundles.insertOne(doc);
    } catch (err) {
      await this.blobs.delete(id).catch(() => {});
      if (err instanceof DuplicateKeyError) throw conflict(`bundle version ${m.version} already exists`);
      throw err;
    }
    this.logger.info({ bundleId: id, version: m.version, size: info.size }, 'bundle stored');
    return doc;
  }

  async list(): Promise<Record<string, unknown>[]> {
    const docs = await this.repos.bundles.find({}, { sort: { created_at: -1 } });
    return docs.sort((a, b) => semver.rcompare(a.version, b.version)).map((d) => present(d));
  }

  async get(id: string): Promise<BundleDoc> {
    const doc = await this.repos.bundles.findOne({ _id: id });
    if (!doc) throw notFound(`bundle ${id}`);
    return doc;
  }

  async byVersion(version: string): Promise<BundleDoc | null> {
    return this.repos.bundles.findOne({ version });
  }

  read(id: string, range?: ByteRange): Promise<Readable> {
    return this.blobs.get(id, range);
  }

  downloadUrl(id: string, ttlSeconds = 300): Promise<string | null> {
    return this.blobs.downloadUrl(id, ttlSeconds);
  }
}
