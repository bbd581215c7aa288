// Results: one row per figure, beside its reference from the same run.
export interface Row {
  scenario: string;
  metric: string;
  unit: string;
  kernex: number | null;
  reference?: { name: string; value: number | null };
  /** kernex / reference (for latencies and times: how many times slower). */
  ratio?: number | null;
  target?: string;
  met?: boolean;
}

export interface ScenarioResult {
  name: string;
  rows: Row[];
  notes: string[];
  details: Record<string, unknown>;
}

export interface BenchContext {
  quick: boolean;
  /** Overrides the scenario's device counts (smoke runs). */
  devices?: number;
  fdLimit: number;
  /**
   * Simulated devices extract bundles and spawn their scripts. Off by
   * default: a thousand devices' processes on the load generator's machine
   * measure that machine, not the controller.
   */
  runScripts: boolean;
  /** Processes the fan-out scenario spreads its receiving devices over. */
  receivers: number;
  log(message: string): void;
}

export function ratio(a: number | null | undefined, b: number | null | undefined): number | null {
  if (a === null || a === undefined || b === null || b === undefined || b === 0) return null;
  return Math.round((a / b) * 100) / 100;
}

const fmt = (v: number | null | undefined, unit: string): string => {
  if (v === null || v === undefined || Number.isNaN(v)) return '-';
  const digits = Math.abs(v) >= 100 ? 0 : Math.abs(v) >= 10 ? 1 : 2;
  return `${v.toLocaleString('en-US', { maximumFractionDigits: digits })} ${unit}`.trim();
};

/** A plain-text table, one line per row. */
export function formatTable(rows: Row[]): string {
  const header = ['scenario', 'metric', 'kernex', 'reference', 'ratio', 'target', ''];
  const lines = rows.map((r) => [
    r.scenario, r.metric, fmt(r.kernex, r.unit),
    r.reference ? `${fmt(r.reference.value, r.unit)} (${r.reference.name})` : '',
    r.ratio === undefined || r.ratio === null ? '' : `${r.ratio}x`,
    r.target ?? '', r.met === undefined ? '' : r.met ? 'ok' : 'MISSED',
  ]);
  const widths = header.map((h, i) => Math.max(h.length, ...lines.map((l) => l[i]!.length)));
  const line = (cells: string[]) => cells.map((c, i) => c.padEnd(widths[i]!)).join('  ').trimEnd();
  return [line(header), line(widths.map((w) => '-'.repeat(w))), ...lines.map(line)].join('\n');
}

/** The same table as Markdown, for the README. */
export function formatMarkdown(rows: Row[]): string {
  const out = ['| scenario | metric | kernex | reference | ratio | target | |', '|---|---|---|---|---|---|---|'];
  for (const r of rows) {
    out.push(`| ${r.scenario} | ${r.metric} | ${fmt(r.kernex, r.unit)} | ${r.reference ? `${fmt(r.reference.value, r.unit)} (${r.reference.name})` : ''} | ${
      r.ratio === undefined || r.ratio === null ? '' : `${r.ratio}x`} | ${r.target ?? ''} | ${r.met === undefined ? '' : r.met ? 'ok' : '**missed**'} |`);
  }
  return out.join('\n');
}
