import type { BenchContext, ScenarioResult } from '../report.js';
export async function heartbeats(_ctx: BenchContext): Promise<ScenarioResult> {
  return { name: 'heartbeats', rows: [], notes: ['not yet'], details: {} };
}
