// External programs the tests drive. Absent locally: the test says so and
// skips; absent in CI: the test fails, because CI must run everything.
import { execFileSync } from 'node:child_process';

export function hasProgram(name: string): boolean {
  try {
    execFileSync('sh', ['-c', `command -v ${name}`], { stdio: 'ignore' });
    return true;
  } catch {
    if (process.env.CI) throw new Error(`${name} is required in CI but not installed (.ci/run installs it)`);
    process.stderr.write(`SKIPPED: ${name} is not installed; install it to run these tests\n`);
    return false;
  }
}
