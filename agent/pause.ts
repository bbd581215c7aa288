// Pause points for fault tests. With KERNEX_AGENT_TEST_PAUSE_AT=<point> the
// agent, on reaching that point of a deploy or rollback, writes the marker file
// `<dataDir>/paused-at-<point>` and waits there until it is stopped. A test
// then kills it at exactly that place instead of racing a timer. Unset (the
// normal case), every pause point is a no-op.
import { writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import type { Logger } from 'pino';

// `spawned`: the script has started, its process group is not recorded yet.
export const PAUSE_POINTS = ['received', 'downloading', 'verified', 'extracting', 'spawned', 'running', 'reporting'] as const;
export type PausePoint = (typeof PAUSE_POINTS)[number];

export const PAUSE_ENV = 'KERNEX_AGENT_TEST_PAUSE_AT';

/** Thrown where the agent stops work that it will take up again on its next start. */
export class ParkedError extends Error {
  readonly code = 'parked';
  constructor(message = 'the agent is stopping; the command is parked and resumes on the next start') {
    super(message);
    this.name = 'ParkedError';
  }
}

export type Pause = (point: PausePoint, deploymentId: string, signal: AbortSignal) => Promise<void>;

export function pauseHook(raw: string | undefined, dataDir: string, logger: Logger): Pause {
  if (!raw) return async () => {};
  if (!(PAUSE_POINTS as readonly string[]).includes(raw)) {
    throw new Error(`${PAUSE_ENV} must be one of ${PAUSE_POINTS.join(', ')}, got '${raw}'`);
  }
  logger.warn({ point: raw }, `${PAUSE_ENV} is set: this agent will stop at '${raw}' (a test hook, never for production)`);
  return async (point, deploymentId, signal) => {
    if (point !== raw) return;
    await writeFile(join(dataDir, `paused-at-${point}`), JSON.stringify({ point, deployment_id: deploymentId, pid: process.pid }));
    logger.warn({ point, deploymentId }, 'paused by test hook');
    await new Promise<never>((_resolve, reject) => {
      const park = () => reject(new ParkedError());
      if (signal.aborted) park();
      signal.addEventListener('abort', park, { once: true });
    });
  };
}
