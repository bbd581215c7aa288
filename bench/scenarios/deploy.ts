import type { BenchContext, ScenarioResult } from '../report.js';
export async function deploy(_ctx: BenchContext): Promise<ScenarioResult> {
  return { name: 'deploy', rows: [], notes: ['not yet'], details: {} };
}
