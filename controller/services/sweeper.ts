// The deployment sweeper: one periodic pass, not a timer per device.
//   - Timeouts: when a deployment's `deadline_at` (created_at + timeout_seconds)
//     has passed and it has not finished, its devices that are still pending or
//     in progress become `timed_out`, so the deployment finishes even when
//     devices never answer. One query over a sparse index finds the due
//     deployments; each one's remaining states change in one conditional write
//     (a result arriving at the same moment wins or loses cleanly).
//   - Repairs: states left `finalizing` by a crash or a store failure between
//     a final state and its history/version are completed; at start, so are
//     deployments whose last state was finalized but which were never marked
//     finished.
import type { Logger } from 'pino';
import { LIVE_DEVICE_STATUSES, now, statesOf, type Repositories } from '../model.js';
import type { DeploymentService } from './deployments.js';

export interface SweeperOptions {
  intervalMs: number;
  /** Documents handled per query, so one pass stays bounded however large the backlog. */
  batch?: number;
  /** A `finalizing` state younger than this is still being completed by whoever made it final. */
  repairAfterMs?: number;
}

/** What one pass did (tests and logs). */
export interface SweepReport {
  timedOut: number;
  repaired: number;
}

export class DeploymentSweeper {
  private timer: NodeJS.Timeout | undefined;
  private current: Promise<SweepReport> | undefined;
  private readonly batch: number;
  private readonly repairAfterMs: number;

  constructor(
    private readonly repos: Repositories,
    private readonly deployments: DeploymentService,
    private readonly logger: Logger,
    private readonly options: SweeperOptions,
  ) {
    this.batch = options.batch ?? 500;
    this.repairAfterMs = options.repairAfterMs ?? 30_000;
  }

  /** Runs a first pass now (completing everything a crash left), then one every interval. */
  async start(): Promise<void> {
    await this.sweep({ repairAll: true }).catch((err: Error) => this.logger.error({ err: err.message }, 'deployment sweep failed'));
    this.timer = setInterval(() => {
      this.sweep().catch((err: Error) => this.logger.error({ err: err.message }, 'deployment sweep failed; retrying at the next pass'));
    }, this.options.intervalMs);
    this.timer.unref();
  }

  async stop(): Promise<void> {
    clearInterval(this.timer);
    this.timer = undefined;
    await this.current?.catch(() => undefined);
  }

  /** One pass; a pass already running is joined, never doubled. */
  sweep(opts: { repairAll?: boolean } = {}): Promise<SweepReport> {
    this.current ??= this.pass(opts).finally(() => (this.current = undefined));
    return this.current;
  }

  private async pass(opts: { repairAll?: boolean }): Promise<SweepReport> {
    const report: SweepReport = { timedOut: 0, repaired: 0 };
    await this.repair(report, opts.repairAll ?? false);
    if (opts.repairAll) await this.completeUnfinished();
    // `$gt: ''` keeps the range off deployments without a deadline in any backend.
    const due = await this.repos.deployments.find(
      { deadline_at: { $gt: '', $lte: now() }, finished_at: null },
      { limit: this.batch },
    );
    for (const dep of due) report.timedOut += await this.expire(dep._id, dep.timeout_seconds);
    if (report.timedOut || report.repaired) this.logger.info(report, 'deployment sweep');
    return report;
  }

  private async expire(deploymentId: string, timeoutSeconds: number | null): Promise<number> {
    const at = now();
    await this.repos.deviceDeployments.updateMany(
      { ...statesOf(deploymentId), status: { $in: LIVE_DEVICE_STATUSES } },
      {
        $set: {
          status: 'timed_out', phase: null, reason: 'deployment_timeout', finished_at: at, updated_at: at, finalizing: true,
          error_message: `no outcome reported within the deployment's timeout of ${timeoutSeconds} s`,
        },
      },
    );
    // The states this pass (or an earlier one that stopped halfway) made final.
    const expired = await this.repos.deviceDeployments.find({ ...statesOf(deploymentId), status: 'timed_out', finalizing: true });
    for (const s of expired) this.logger.warn({ deploymentId, deviceId: s.device_id, timeoutSeconds }, 'device timed out');
    if (expired.length) await this.deployments.finalize(expired, { count: true });
    // Every device had reported, but the deployment was never marked finished (a crash in between).
    else await this.deployments.completeIfDone(deploymentId);
    return expired.length;
  }

  /**
   * At start: deployments whose states are all final and finalized but which
   * were never marked finished (a crash between the last mark's removal and
   * the completion). Only unfinished deployments are read, a batch at a time.
   */
  private async completeUnfinished(): Promise<void> {
    let after = '';
    for (;;) {
      const open = await this.repos.deployments.find(
        { finished_at: null, _id: { $gt: after } }, { sort: { _id: 1 }, limit: this.batch },
      );
      for (const dep of open) await this.deployments.completeIfDone(dep._id);
      if (open.length < this.batch) return;
      after = open.at(-1)!._id;
    }
  }

  private async repair(report: SweepReport, all: boolean): Promise<void> {
    const filter: Record<string, unknown> = { finalizing: true };
    if (!all) filter.updated_at = { $lt: new Date(Date.now() - this.repairAfterMs).toISOString() };
    for (;;) {
      const stuck = await this.repos.deviceDeployments.find(filter, { limit: this.batch });
      if (!stuck.length) return;
      await this.deployments.finalize(stuck, { count: false });
      report.repaired += stuck.length;
      if (stuck.length < this.batch) return;
    }
  }
}
