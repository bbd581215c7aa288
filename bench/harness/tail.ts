// Follows an append-only file (the embedded store's datafile) and hands each
// complete new line to `onLine`: what is in the file is what was persisted.
import { open, stat, type FileHandle } from 'node:fs/promises';

export class FileTail {
  private offset = 0;
  private rest = '';
  private timer: NodeJS.Timeout | undefined;
  private handle: FileHandle | undefined;
  private reading = false;

  constructor(private readonly file: string, private readonly onLine: (line: string) => void, private readonly everyMs = 10) {}

  /** Starts at the current end of the file: only lines written from now on are seen. */
  async start(): Promise<void> {
    this.handle = await open(this.file, 'r');
    this.offset = (await stat(this.file)).size;
    this.timer = setInterval(() => void this.read(), this.everyMs);
  }

  async read(): Promise<void> {
    if (this.reading || !this.handle) return;
    this.reading = true;
    try {
      const size = (await stat(this.file)).size;
      if (size < this.offset) this.offset = 0; // rewritten (compaction): start over
      while (this.offset < size) {
        const buf = Buffer.alloc(Math.min(4 << 20, size - this.offset));
        const { bytesRead } = await this.handle.read(buf, 0, buf.length, this.offset);
        if (bytesRead === 0) break;
        this.offset += bytesRead;
        const text = this.rest + buf.subarray(0, bytesRead).toString('utf8');
        const lines = text.split('\n');
        this.rest = lines.pop() ?? '';
        for (const line of lines) if (line) this.onLine(line);
      }
    } finally {
      this.reading = false;
    }
  }

  async stop(): Promise<void> {
    clearInterval(this.timer);
    await this.handle?.close();
    this.handle = undefined;
  }
}
