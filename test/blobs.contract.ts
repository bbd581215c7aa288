// The blob port's contract: every backend runs exactly this suite, so the
// controller can be written once against BlobStore.
import { createHash, randomBytes } from 'node:crypto';
import { Readable } from 'node:stream';
import {
  BlobKeyError,
  BlobNotFoundError,
  BlobRangeError,
  BlobTooLargeError,
  type BlobStore,
  type ByteRange,
} from '../controller/blobs/index.js';

const MiB = 1024 * 1024;
// Several MiB and not a multiple of anything: big enough to span several S3
// parts at the 5 MiB minimum part size, odd enough to catch boundary slips.
export const CONTRACT_DATA_SIZE = 12 * MiB + 12_345;
const CHUNK = 64 * 1024 + 7;

const sha256 = (bytes: Buffer): string => createHash('sha256').update(bytes).digest('hex');

/** A byte stream of `bytes` in chunks; counts what it handed out. */
function source(bytes: Buffer, opts: { failAfter?: number; gate?: Gate } = {}) {
  const stats = { emitted: 0 };
  async function* chunks(): AsyncGenerator<Buffer> {
    for (let at = 0; at < bytes.length; at += CHUNK) {
      if (opts.failAfter !== undefined && at >= opts.failAfter) throw new Error('source broke');
      if (opts.gate && at >= opts.gate.at) await opts.gate.reached();
      const chunk = bytes.subarray(at, at + CHUNK);
      stats.emitted += chunk.length;
      yield chunk;
    }
  }
  return { stream: Readable.from(chunks(), { objectMode: false }), stats };
}

/** Pauses a source at byte `at` until the test opens it. */
class Gate {
  private open!: () => void;
  private arrived!: () => void;
  private readonly opened = new Promise<void>((resolve) => (this.open = resolve));
  readonly arrival = new Promise<void>((resolve) => (this.arrived = resolve));
  constructor(readonly at: number) {}
  reached(): Promise<void> {
    this.arrived();
    return this.opened;
  }
  release(): void {
    this.open();
  }
}

async function readAll(stream: Readable): Promise<Buffer> {
  const chunks: Buffer[] = [];
  for await (const chunk of stream) chunks.push(Buffer.from(chunk as Uint8Array));
  return Buffer.concat(chunks);
}

export function blobContract(
  name: string,
  open: () => Promise<BlobStore>,
  teardown?: () => Promise<void>,
): void {
  describe(`BlobStore contract: ${name}`, () => {
    const data = randomBytes(CONTRACT_DATA_SIZE);
    const n = data.length;
    let store: BlobStore;
    let stored: string; // `data` stored once for the read-only tests
    let seq = 0;
    const newKey = (): string => `k${++seq}-${randomBytes(4).toString('hex')}`;
    const read = async (key: string, range?: ByteRange) => readAll(await store.get(key, range));

    beforeAll(async () => {
      store = await open();
      stored = newKey();
      await store.put(stored, source(data).stream);
    });

    afterAll(async () => {
      await store?.close();
      await teardown?.();
    });

    test('put streams the bytes in and reports their size and sha256', async () => {
      const key = newKey();
      const info = await store.put(key, source(data).stream);
      expect(info).toEqual({ size: n, sha256: sha256(data) });
      expect(await store.stat(key)).toEqual({ size: n });
    });

    test('get returns the whole blob', async () => {
      const back = await read(stored);
      expect(back.length).toBe(n);
      expect(back.equals(data)).toBe(true);
    });

    test('an empty blob is a blob', async () => {
      const key = newKey();
      expect(await store.put(key, source(Buffer.alloc(0)).stream)).toEqual({ size: 0, sha256: sha256(Buffer.alloc(0)) });
      expect(await store.stat(key)).toEqual({ size: 0 });
      expect((await read(key)).length).toBe(0);
    });

    test.each<[string, (size: number) => ByteRange]>([
      ['the first byte', () => ({ start: 0, end: 0 })],
      ['the last byte', (size) => ({ start: size - 1, end: size - 1 })],
      ['a middle span', () => ({ start: 1_000_003, end: 3_500_017 })],
      ['from an offset to the end', (size) => ({ start: size - 70_001, end: size - 1 })],
      ['the first 100 bytes', () => ({ start: 0, end: 99 })],
    ])('get with a range returns exactly %s', async (_what, rangeOf) => {
      const range = rangeOf(n);
      expect((await read(stored, range)).equals(data.subarray(range.start, range.end + 1))).toBe(true);
    });

    test('a range ending past the blob is clamped to its last byte', async () => {
      expect((await read(stored, { start: n - 10, end: n + 1000 })).equals(data.subarray(n - 10))).toBe(true);
    });

    test('a range starting past the blob is BlobRangeError; a malformed one is RangeError', async () => {
      await expect(store.get(stored, { start: n, end: n + 10 })).rejects.toBeInstanceOf(BlobRangeError);
      await expect(store.get(stored, { start: 5, end: 4 })).rejects.toBeInstanceOf(RangeError);
      await expect(store.get(stored, { start: -1, end: 4 })).rejects.toBeInstanceOf(RangeError);
    });

    test('stat is the size when present, null when absent', async () => {
      expect(await store.stat(stored)).toEqual({ size: n });
      expect(await store.stat(newKey())).toBeNull();
    });

    test('get of an absent key is BlobNotFoundError, with or without a range', async () => {
      const key = newKey();
      await expect(store.get(key)).rejects.toBeInstanceOf(BlobNotFoundError);
      await expect(store.get(key, { start: 0, end: 10 })).rejects.toBeInstanceOf(BlobNotFoundError);
    });

    test('delete removes the blob; deleting an absent key is fine', async () => {
      const key = newKey();
      await store.put(key, source(data.subarray(0, 1000)).stream);
      await store.delete(key);
      expect(await store.stat(key)).toBeNull();
      await expect(store.get(key)).rejects.toBeInstanceOf(BlobNotFoundError);
      await expect(store.delete(key)).resolves.toBeUndefined();
      await expect(store.delete(newKey())).resolves.toBeUndefined();
    });

    test('put accepts exactly maxBytes and refuses one byte more, storing nothing', async () => {
      const small = data.subarray(0, 10_000);
      const ok = newKey();
      expect(await store.put(ok, source(small).stream, { maxBytes: small.length })).toEqual({
        size: small.length,
        sha256: sha256(small),
      });
      const tooBig = newKey();
      const err = await store.put(tooBig, source(small).stream, { maxBytes: small.length - 1 }).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(BlobTooLargeError);
      expect((err as BlobTooLargeError).code).toBe('blob_too_large');
      expect(await store.stat(tooBig)).toBeNull();
    });

    test('an oversized upload is cut off early: nothing stored, the source destroyed unread', async () => {
      const key = newKey();
      const maxBytes = 6 * MiB; // past the first S3 part, so a multipart upload is under way
      const { stream, stats } = source(data);
      await expect(store.put(key, stream, { maxBytes })).rejects.toBeInstanceOf(BlobTooLargeError);
      expect(stream.destroyed).toBe(true);
      expect(stats.emitted).toBeLessThan(maxBytes + 2 * CHUNK);
      expect(await store.stat(key)).toBeNull();
      await expect(store.get(key)).rejects.toBeInstanceOf(BlobNotFoundError);
    });

    test.each([
      ['early', 3 * CHUNK],
      ['after several MiB', 7 * MiB],
    ])('a source that errors %s makes put reject and stores nothing', async (_when, failAfter) => {
      const key = newKey();
      await expect(store.put(key, source(data, { failAfter }).stream)).rejects.toThrow('source broke');
      expect(await store.stat(key)).toBeNull();
    });

    test('a source destroyed midway without an error is not taken for a complete upload', async () => {
      const key = newKey();
      const gate = new Gate(2 * MiB);
      const { stream } = source(data, { gate });
      const put = store.put(key, stream);
      await gate.arrival;
      stream.destroy();
      gate.release();
      await expect(put).rejects.toThrow();
      expect(await store.stat(key)).toBeNull();
    });

    test('nothing is visible under the key until the upload ends; then it replaces the old blob', async () => {
      const key = newKey();
      const old = data.subarray(0, 5000);
      await store.put(key, source(old).stream);
      const gate = new Gate(6 * MiB); // past the first S3 part
      const put = store.put(key, source(data, { gate }).stream);
      await gate.arrival;
      expect(await store.stat(key)).toEqual({ size: old.length });
      expect((await read(key)).equals(old)).toBe(true);
      gate.release();
      expect((await put).size).toBe(n);
      expect((await read(key)).equals(data)).toBe(true);
    });

    test('overwriting a key replaces its bytes', async () => {
      const key = newKey();
      await store.put(key, source(data).stream);
      const replacement = randomBytes(4321);
      expect(await store.put(key, source(replacement).stream)).toEqual({ size: 4321, sha256: sha256(replacement) });
      expect(await store.stat(key)).toEqual({ size: 4321 });
      expect((await read(key)).equals(replacement)).toBe(true);
    });

    test('a failed overwrite leaves the previous blob as it was', async () => {
      const key = newKey();
      const old = randomBytes(2000);
      await store.put(key, source(old).stream);
      await expect(store.put(key, source(data).stream, { maxBytes: 1 * MiB })).rejects.toBeInstanceOf(BlobTooLargeError);
      await expect(store.put(key, source(data, { failAfter: 100_000 }).stream)).rejects.toThrow('source broke');
      expect((await read(key)).equals(old)).toBe(true);
    });

    test('concurrent puts of different keys do not mix', async () => {
      const blobs = [randomBytes(300_000), randomBytes(1), randomBytes(2 * MiB + 3)];
      const keys = blobs.map(() => newKey());
      await Promise.all(blobs.map((b, i) => store.put(keys[i]!, source(b).stream)));
      for (const [i, b] of blobs.entries()) expect((await read(keys[i]!)).equals(b)).toBe(true);
    });

    test.each(
      ['../x', 'a/b', '', '.tmp', '.hidden', 'a..b', '..', 'x'.repeat(201), 'sp ace', 'caf\u00e9', 'a\\b'].map((k) => [
        k.length > 20 ? `of ${k.length} characters` : JSON.stringify(k),
        k,
      ]),
    )('the key %s is refused everywhere', async (_label, bad) => {
      const { stream } = source(data.subarray(0, 100));
      await expect(store.put(bad, stream)).rejects.toBeInstanceOf(BlobKeyError);
      expect(stream.destroyed).toBe(true);
      await expect(store.get(bad)).rejects.toBeInstanceOf(BlobKeyError);
      await expect(store.stat(bad)).rejects.toBeInstanceOf(BlobKeyError);
      await expect(store.delete(bad)).rejects.toBeInstanceOf(BlobKeyError);
      await expect(store.downloadUrl(bad, 60)).rejects.toBeInstanceOf(BlobKeyError);
    });

    test('keys from the whole portable charset work', async () => {
      for (const key of ['A-Za_z.09', '0', '-', '_x', 'x'.repeat(200), 'f47ac10b-58cc-4372-a567-0e02b2c3d479']) {
        await store.put(key, source(Buffer.from(key)).stream);
        expect((await read(key)).toString()).toBe(key);
        await store.delete(key);
      }
    });

    test('downloadUrl, when the backend gives one, serves exactly the bytes and honours Range', async () => {
      const url = await store.downloadUrl(stored, 60);
      if (url === null) return; // this backend's bytes are served by the controller
      expect(new URL(url).protocol).toMatch(/^https?:$/);

      const whole = await fetch(url);
      expect(whole.status).toBe(200);
      expect(Buffer.from(await whole.arrayBuffer()).equals(data)).toBe(true);

      // What a device resuming a download sends. (Not `bytes=0-0`: s3rver
      // answers that with the whole object, see blobs.s3.test.ts.)
      const span = await fetch(url, { headers: { Range: 'bytes=1000-1999' } });
      expect(span.status).toBe(206);
      expect(span.headers.get('content-range')).toBe(`bytes 1000-1999/${n}`);
      expect(Buffer.from(await span.arrayBuffer()).equals(data.subarray(1000, 2000))).toBe(true);

      const tail = await fetch(url, { headers: { Range: `bytes=${n - 777}-` } });
      expect(tail.status).toBe(206);
      expect(Buffer.from(await tail.arrayBuffer()).equals(data.subarray(n - 777))).toBe(true);
    });
  });
}
