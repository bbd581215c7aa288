import type { BenchContext, ScenarioResult } from '../report.js';
export async function storm(_ctx: BenchContext): Promise<ScenarioResult> {
  return { name: 'storm', rows: [], notes: ['not yet'], details: {} };
}
