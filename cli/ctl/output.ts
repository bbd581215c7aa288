// How kernexctl prints. Three modes, chosen by global flags:
//   default  aligned tables and sentences for people (colour on a terminal)
//   --json   exactly one JSON document on stdout (NDJSON for streams), nothing else
//   --quiet  only the essential ids, one per line (for `xargs` and `$(...)`)
// Errors always go to stderr as one line.
import { styleText } from 'node:util';

export type Mode = 'human' | 'json' | 'quiet';

type Style = Parameters<typeof styleText>[0];

export interface Column<T> {
  header: string;
  value: (row: T) => string;
  /** Colour for the cell, on a terminal. */
  style?: (row: T) => Style | undefined;
}

const STATUS_STYLE: Record<string, Style> = {
  online: 'green', success: 'green', ok: 'green', applied: 'green',
  offline: 'gray', pending: 'gray',
  in_progress: 'yellow', running: 'yellow',
  error: 'red', failed: 'red', timed_out: 'red', rolled_back: 'magenta',
};

export class Output {
  readonly color: boolean;
  private statusLine: StatusLine | null = null;

  constructor(
    readonly mode: Mode,
    readonly stdout: NodeJS.WriteStream = process.stdout,
    readonly stderr: NodeJS.WriteStream = process.stderr,
    private verboseOn = false,
  ) {
    this.color = Boolean(stdout.isTTY) && !process.env.NO_COLOR && mode === 'human';
  }

  get human(): boolean {
    return this.mode === 'human';
  }

  style(text: string, style: Style | undefined): string {
    return this.color && style ? styleText(style, text) : text;
  }

  statusStyle(status: string | null | undefined): Style | undefined {
    return status ? STATUS_STYLE[status] : undefined;
  }

  /** A line for people (human mode only). */
  line(text = ''): void {
    if (this.mode !== 'human') return;
    this.write(text);
  }

  /** An id (quiet mode) — e.g. the bundle just uploaded. */
  id(text: string): void {
    if (this.mode === 'quiet') this.stdout.write(`${text}\n`);
  }

  json(value: unknown): void {
    if (this.mode === 'json') this.stdout.write(`${JSON.stringify(value, null, 2)}\n`);
  }

  /** One compact JSON line, for streams (watch). */
  jsonLine(value: unknown): void {
    if (this.mode === 'json') this.stdout.write(`${JSON.stringify(value)}\n`);
  }

  /** Diagnostics for --verbose, on stderr. */
  verbose(text: string): void {
    if (this.verboseOn) this.stderr.write(`${this.style(`· ${text}`, 'dim')}\n`);
  }

  /** A notice that is not the command's output (stderr; silent in --json/--quiet). */
  notice(text: string): void {
    if (this.mode !== 'human') return;
    this.withStatusCleared(() => this.stderr.write(`${text}\n`));
  }

  table<T>(columns: Column<T>[], rows: T[]): void {
    if (this.mode !== 'human') return;
    const cells = rows.map((r) => columns.map((c) => clean(c.value(r))));
    const widths = columns.map((c, i) => Math.max(c.header.length, ...cells.map((row) => row[i]!.length)));
    const render = (values: string[], styles?: (Style | undefined)[]) =>
      values
        .map((v, i) => {
          const padded = i === values.length - 1 ? v : v.padEnd(widths[i]!);
          return this.style(padded, styles?.[i]);
        })
        .join('  ')
        .trimEnd();
    this.write(render(columns.map((c) => c.header), columns.map(() => 'bold' as Style)));
    rows.forEach((row, r) => this.write(render(cells[r]!, columns.map((c) => c.style?.(row)))));
  }

  /** `key  value` pairs, aligned, for one object. */
  fields(pairs: Array<[string, string]>): void {
    if (this.mode !== 'human') return;
    const width = Math.max(...pairs.map(([k]) => k.length));
    for (const [k, v] of pairs) this.write(`${this.style(k.padEnd(width), 'bold')}  ${v}`);
  }

  /**
   * A line redrawn in place at the bottom of a terminal (progress bars, live
   * counts). Only when stderr is a terminal and in human mode; otherwise null.
   */
  liveLine(): StatusLine | null {
    if (this.mode !== 'human' || !this.stderr.isTTY) return null;
    this.statusLine ??= new StatusLine(this.stderr);
    return this.statusLine;
  }

  private write(text: string): void {
    this.withStatusCleared(() => this.stdout.write(`${text}\n`));
  }

  private withStatusCleared(fn: () => void): void {
    const live = this.statusLine;
    if (live?.shown) {
      live.clear();
      fn();
      live.redraw();
    } else {
      fn();
    }
  }
}

/** The bottom line of a terminal, rewritten in place; at most ~10 redraws a second. */
export class StatusLine {
  private text = '';
  private lastDraw = 0;
  shown = false;

  constructor(private stream: NodeJS.WriteStream) {}

  set(text: string, force = false): void {
    this.text = text;
    const t = Date.now();
    if (!force && t - this.lastDraw < 100) return;
    this.lastDraw = t;
    this.redraw();
  }

  redraw(): void {
    if (!this.text) return;
    const width = this.stream.columns || 80;
    this.stream.write(`\r\x1b[2K${this.text.slice(0, width - 1)}`);
    this.shown = true;
  }

  clear(): void {
    if (!this.shown) return;
    this.stream.write('\r\x1b[2K');
    this.shown = false;
  }

  /** Leaves the last text on screen and moves to a new line. */
  done(text?: string): void {
    if (text !== undefined) this.text = text;
    this.redraw();
    if (this.shown) this.stream.write('\n');
    this.shown = false;
    this.text = '';
  }
}

/** Control characters out of a table cell, so a hostile field cannot redraw the terminal. */
const clean = (s: string) => s.replace(/[\u0000-\u001f\u007f]/g, ' ');

export const dash = (v: unknown): string => (v === null || v === undefined || v === '' ? '-' : String(v));

export function formatBytes(n: number): string {
  if (n < 1024) return `${n} B`;
  const units = ['KiB', 'MiB', 'GiB', 'TiB'];
  let v = n;
  let u = -1;
  do {
    v /= 1024;
    u++;
  } while (v >= 1024 && u < units.length - 1);
  return `${v.toFixed(v < 10 ? 1 : 0)} ${units[u]}`;
}

export function formatDuration(seconds: number | string | null | undefined): string {
  const s = typeof seconds === 'string' ? Number(seconds) : seconds;
  if (s === null || s === undefined || !Number.isFinite(s)) return '-';
  if (s < 1) return `${Math.round(s * 1000)}ms`;
  if (s < 60) return `${s.toFixed(s < 10 ? 1 : 0)}s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m}m${Math.round(s % 60)}s`;
  return `${Math.floor(m / 60)}h${m % 60}m`;
}

/** "12s ago", "3m ago", or the date when older than a day. */
export function formatAge(iso: string | null | undefined, now = Date.now()): string {
  if (!iso) return '-';
  const t = Date.parse(iso);
  if (!Number.isFinite(t)) return iso;
  const s = Math.max(0, Math.round((now - t) / 1000));
  if (s < 60) return `${s}s ago`;
  if (s < 3600) return `${Math.floor(s / 60)}m ago`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ago`;
  return iso.slice(0, 10);
}

export function formatTime(iso: string | Date): string {
  const d = typeof iso === 'string' ? new Date(iso) : iso;
  const pad = (n: number, w = 2) => String(n).padStart(w, '0');
  return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(d.getMilliseconds(), 3)}`;
}

export function progressBar(done: number, total: number, width = 28): string {
  const ratio = total > 0 ? Math.min(1, done / total) : 1;
  const full = Math.round(ratio * width);
  return `[${'#'.repeat(full)}${'-'.repeat(width - full)}] ${String(Math.floor(ratio * 100)).padStart(3)}%`;
}
