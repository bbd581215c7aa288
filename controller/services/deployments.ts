// Deployments and rollbacks: create them, push their commands, record each
// device's outcome exactly once, and re-send what is still pending when a
// device comes back.
import { randomUUID } from 'node:crypto';
import type { Logger } from 'pino';
import type { BundleCommand, CommandResult } from '../../schemas/index.js';
import type {
  BundleDoc, DeploymentDoc, DeploymentKind, DeviceDeploymentDoc, DeviceDeploymentStatus, HistoryDoc, Repositories,
} from '../model.js';
import { FINAL_DEVICE_STATUSES, LIVE_DEVICE_STATUSES, now, present, statesOf } from '../model.js';
import type { FleetPublisher } from '../mqtt/publisher.js';
import type { BundleService } from './bundles.js';
import type { DeviceService } from './devices.js';
import type { HistoryService } from './history.js';
import { badRequest, notFound } from '../errors.js';

export interface CreateDeployment {
  bundle: BundleDoc;
  targetDeviceIds: string[];
  kind: DeploymentKind;
  timeoutSeconds?: number;
}

/**
 * What recording a result did, for the caller's logs and counters: `ignored`
 * is a result that contradicts the recorded final state (e.g. one arriving
 * after the device was marked timed_out), `unknown` one for a deployment the
 * device is not part of.
 */
export type RecordOutcome = 'recorded' | 'progress' | 'duplicate' | 'ignored' | 'unknown';

const stateId = (deploymentId: string, deviceId: string) => `${deploymentId}:${deviceId}`;

/** Finished-device counts of one deployment not yet written, and who waits for them. */
interface PendingCounts {
  finished: number;
  succeeded: number;
  failed: number;
  timed_out: number;
  waiters: Array<{ resolve: (written: DeploymentDoc | null) => void; reject: (err: Error) => void }>;
  writing: boolean;
}

export class DeploymentService {
  private readonly counting = new Map<string, PendingCounts>();
  /** Per deployment: the completion check running, and the one queued after it. */
  private readonly completionChecks = new Map<string, { running?: Promise<void>; next?: Promise<void> }>();

  constructor(
    private repos: Repositories,
    private bundles: BundleService,
    private devices: DeviceService,
    private publisher: FleetPublisher,
    private logger: Logger,
    private history: HistoryService,
  ) {}

  /** Resolves a bundle given by id or by version, with a clear error when neither exists. */
  async resolveBundle(ref: { bundle_id?: string; bundle_version?: string }): Promise<BundleDoc> {
    const bundle = ref.bundle_id
      ? await this.repos.bundles.findOne({ _id: ref.bundle_id })
      : await this.bundles.byVersion(ref.bundle_version!);
    if (!bundle) {
      throw badRequest(ref.bundle_id ? `bundle ${ref.bundle_id} does not exist` : `bundle version ${ref.bundle_version} does not exist`,
        'unknown_bundle');
    }
    if (ref.bundle_id && ref.bundle_version && bundle.version !== ref.bundle_version) {
      throw badRequest(`bundle ${ref.bundle_id} has version ${bundle.version}, not ${ref.bundle_version}`);
    }
    return bundle;
  }

  async create(input: CreateDeployment): Promise<DeploymentDoc> {
    const missing = await this.devices.missing(input.targetDeviceIds);
    if (missing.length) throw badRequest(`unknown device(s): ${missing.join(', ')}`, 'unknown_device');
    const at = now();
    const deployment: DeploymentDoc = {
      _id: randomUUID(), kind: input.kind, bundle_id: input.bundle._id, bundle_version: input.bundle.version,
      target_device_ids: input.targetDeviceIds, status: 'pending', total: input.targetDeviceIds.length,
      finished: 0, succeeded: 0, failed: 0, timed_out: 0, timeout_seconds: input.timeoutSeconds ?? null,
      created_at: at, updated_at: at, finished_at: null,
    };
    if (input.timeoutSeconds) deployment.deadline_at = new Date(Date.parse(at) + input.timeoutSeconds * 1000).toISOString();
    const states: DeviceDeploymentDoc[] = input.targetDeviceIds.map((deviceId) => ({
      _id: stateId(deployment._id, deviceId), deployment_id: deployment._id, device_id: deviceId, kind: input.kind,
      bundle_id: input.bundle._id, bundle_version: input.bundle.version, status: 'pending', phase: null,
      exit_code: null, output_tail: null, error_message: null, reason: null, created_at: at, started_at: null, finished_at: null,
      duration_seconds: null, updated_at: at,
    }));
    // States first: a deployment is only visible once every target has its state.
    try {
      await this.repos.deviceDeployments.insertMany(states);
      await this.repos.deployments.insertOne(deployment);
    } catch (err) {
      // Nothing half-created stays behind. (Should the cleanup fail too, the states
      // left have no deployment: never sent, never shown, never timed out.)
      await this.repos.deviceDeployments.deleteMany(statesOf(deployment._id)).catch(() => {});
      throw err;
    }
    this.logger.info({ deploymentId: deployment._id, kind: input.kind, version: input.bundle.version, targets: states.length },
      'deployment created');
    void this.publisher.event({
      type: 'deployment.created', deployment_id: deployment._id, kind: input.kind, bundle_version: deployment.bundle_version,
      target_device_ids: deployment.target_device_ids, status: deployment.status, at,
    });
    // Fan out without waiting device by device; a device that is offline gets
    // it from its persistent session, or from resendPending when it returns.
    const failed = await this.publisher.commandMany(input.targetDeviceIds, this.command(deployment, input.bundle));
    if (failed.length) {
      // One line for the lot: a broker in trouble would otherwise log once per device.
      this.logger.warn({ deploymentId: deployment._id, devices: failed.length, first: failed[0]!.deviceId, err: failed[0]!.error.message },
        'commands not published; they are re-sent when the devices reconnect');
    }
    return deployment;
  }

  private command(deployment: DeploymentDoc, bundle: BundleDoc): BundleCommand {
    return {
      type: deployment.kind, command_id: deployment._id, deployment_id: deployment._id, bundle_id: bundle._id,
      bundle_version: bundle.version, sha256: bundle.sha256, size: bundle.size,
      url: `/api/v1/bundles/${bundle._id}`, issued_at: deployment.created_at,
      ...(bundle.signature ? { signature: bundle.signature } : {}),
    };
  }

  /** Commands this device has not finished, oldest first (for resends and HTTP polling). */
  async pendingCommands(deviceId: string): Promise<BundleCommand[]> {
    // One query per status: an equality on (device_id, status) is served by its
    // index in every backend, `$in` is not in NeDB (a scan of every state).
    const states = (await Promise.all(LIVE_DEVICE_STATUSES.map((status) =>
      this.repos.deviceDeployments.find({ device_id: deviceId, status }))))
      .flat().sort((a, b) => a.created_at.localeCompare(b.created_at));
    if (!states.length) return [];
    const [deployments, bundles] = await Promise.all([
      this.repos.deployments.find({ _id: { $in: [...new Set(states.map((s) => s.deployment_id))] } }),
      this.repos.bundles.find({ _id: { $in: [...new Set(states.map((s) => s.bundle_id))] } }),
    ]);
    const depById = new Map(deployments.map((d) => [d._id, d]));
    const bundleById = new Map(bundles.map((b) => [b._id, b]));
    return states.flatMap((s) => {
      const dep = depById.get(s.deployment_id);
      const bundle = bundleById.get(s.bundle_id);
      return dep && bundle ? [this.command(dep, bundle)] : [];
    });
  }

  /** Called when a device subscribes to its commands: push whatever it has not finished. */
  async resendPending(deviceId: string): Promise<number> {
    const commands = await this.pendingCommands(deviceId);
    await Promise.all(commands.map((c) => this.publisher.command(deviceId, c)));
    if (commands.length) this.logger.debug({ deviceId, count: commands.length }, 'pending commands re-sent');
    return commands.length;
  }

  /**
   * Records a device's report. A final outcome is written once: the state
   * update is conditional on the state not being final, and the history
   * entry's id is derived from (deployment, device), so a duplicate report or
   * a retry after a crash changes nothing.
   */
  async recordResult(deviceId: string, result: CommandResult): Promise<RecordOutcome> {
    const id = stateId(result.deployment_id, deviceId);
    const state = await this.repos.deviceDeployments.findOne({ _id: id });
    if (!state) {
      this.logger.warn({ deviceId, deploymentId: result.deployment_id }, 'result for an unknown deployment ignored');
      return 'unknown';
    }
    const at = now();
    if (result.status === 'in_progress') {
      const res = await this.repos.deviceDeployments.updateOne(
        { _id: id, status: { $in: ['pending', 'in_progress'] } },
        { $set: { status: 'in_progress', phase: result.phase ?? null, updated_at: at, started_at: state.started_at ?? at } },
      );
      if (res.matched === 0) {
        this.logger.debug({ deviceId, deploymentId: result.deployment_id, recorded: state.status },
          'progress for a finished deployment ignored');
        return 'ignored';
      }
      if (state.status === 'pending') {
        await this.repos.deployments.updateOne({ _id: state.deployment_id, status: 'pending' },
          { $set: { status: 'in_progress', updated_at: at } });
      }
      this.progressEvent(state, 'in_progress', null);
      return 'progress';
    }
    const finalStatus: DeviceDeploymentStatus = result.status;
    const updated = await this.repos.deviceDeployments.findOneAndUpdate(
      { _id: id, status: { $nin: FINAL_DEVICE_STATUSES } },
      {
        $set: {
          status: finalStatus, phase: null, exit_code: result.exit_code ?? null, output_tail: result.output_tail ?? null,
          error_message: result.error_message ?? null, reason: result.reason ?? null, duration_seconds: result.duration_seconds ?? null,
          finished_at: at, updated_at: at, started_at: state.started_at ?? at, finalizing: true,
        },
      },
    );
    if (!updated) return this.alreadyFinal(deviceId, id, result);
    await this.finalize([updated], { count: true });
    this.progressEvent(updated, finalStatus, result.error_message ?? null);
    return 'recorded';
  }

  /** A final result for a state that is final already: a re-send, or a late or contradicting report. */
  private async alreadyFinal(deviceId: string, id: string, result: CommandResult): Promise<RecordOutcome> {
    const current = await this.repos.deviceDeployments.findOne({ _id: id });
    if (!current) return 'unknown';
    // An earlier attempt stopped between the state and its consequences: complete them now.
    if (current.finalizing) await this.finalize([current], { count: false });
    // Or it stopped after the mark was removed, before the deployment's completion.
    else if ((await this.repos.deployments.findOne({ _id: current.deployment_id }))?.finished_at === null) {
      await this.completeIfDone(current.deployment_id);
    }
    if (current.status === result.status) {
      this.logger.debug({ deviceId, deploymentId: current.deployment_id }, 'duplicate result ignored');
      return 'duplicate';
    }
    this.logger.warn(
      { deviceId, deploymentId: current.deployment_id, recorded: current.status, reported: result.status },
      `result for a finished deployment ignored: this device's outcome was recorded as ${current.status}`,
    );
    return 'ignored';
  }

  /**
   * What follows states becoming final: their history entries and the
   * device's current version; then the states' `finalizing` mark is removed;
   * then the deployment's counters and, once no state is live or finalizing,
   * its outcome. The deployment is thus never finished before every device's
   * history and version are written, even when several devices' results are
   * being finalized at once (the last mark removed sees the others gone).
   * Every step but the counting is idempotent, so a repeat after a crash or a
   * store failure halfway (`count: false`) changes nothing already done.
   * Progress counters are incremented once per state in the normal path; a
   * repair does not increment (it cannot know whether the first attempt did),
   * and the outcome is counted exactly from the states when the deployment
   * completes, so a crash can at worst make the progress figures lag a little.
   * A crash between the mark's removal and the completion is completed by the
   * sweep at start (`completeUnfinished`), a store failure there by the
   * device's re-sent result (`alreadyFinal`).
   */
  async finalize(states: DeviceDeploymentDoc[], opts: { count: boolean }): Promise<void> {
    if (!states.length) return;
    await this.writeHistory(states);
    for (const s of states) if (s.status === 'success') await this.updateDeviceVersion(s);
    await this.repos.deviceDeployments.updateMany(
      { _id: { $in: states.map((s) => s._id) }, finalizing: true },
      { $unset: { finalizing: true } },
    );
    const byDeployment = new Map<string, DeviceDeploymentDoc[]>();
    for (const s of states) byDeployment.set(s.deployment_id, [...(byDeployment.get(s.deployment_id) ?? []), s]);
    for (const [deploymentId, group] of byDeployment) {
      if (opts.count) await this.countFinished(deploymentId, group);
      await this.checkCompletion(deploymentId);
    }
  }

  private async writeHistory(states: DeviceDeploymentDoc[]): Promise<void> {
    const entries: HistoryDoc[] = states.map((state) => ({
      _id: state._id, device_id: state.device_id, bundle_version: state.bundle_version, bundle_id: state.bundle_id,
      deployment_id: state.deployment_id, kind: state.kind, status: state.status === 'success' ? 'success' : 'failed',
      error_message: state.error_message, deployed_at: state.finished_at ?? now(), duration_seconds: state.duration_seconds,
    }));
    await this.history.recordMany(entries);
  }

  /** The device runs this version now, unless a later deployment already succeeded on it (a late report). */
  private async updateDeviceVersion(state: DeviceDeploymentDoc): Promise<void> {
    const newest = await this.repos.deviceDeployments.findOne(
      { device_id: state.device_id, status: 'success' }, { sort: { created_at: -1 } },
    );
    if (newest && newest._id !== state._id && newest.created_at > state.created_at) return;
    await this.devices.setBundleVersion(state.device_id, state.bundle_version);
  }

  /**
   * Progress figures; once the deployment has finished, its exact counts are
   * final and nothing is added. Counts arriving while the deployment's
   * previous count is being written are added up and written together: the
   * deployment document holds every target id, so one write per device made
   * a deployment to N devices cost O(N²) bytes. Resolves, once these states
   * are counted, with the counters written (null once finished).
   */
  private countFinished(deploymentId: string, states: DeviceDeploymentDoc[]): Promise<DeploymentDoc | null> {
    let c = this.counting.get(deploymentId);
    if (!c) this.counting.set(deploymentId, (c = { finished: 0, succeeded: 0, failed: 0, timed_out: 0, waiters: [], writing: false }));
    const succeeded = states.filter((s) => s.status === 'success').length;
    c.finished += states.length;
    c.succeeded += succeeded;
    c.failed += states.length - succeeded;
    c.timed_out += states.filter((s) => s.status === 'timed_out').length;
    const pending = c;
    const stored = new Promise<DeploymentDoc | null>((resolve, reject) => pending.waiters.push({ resolve, reject }));
    if (!c.writing) void this.writeCounts(deploymentId, c);
    return stored;
  }

  private async writeCounts(deploymentId: string, c: PendingCounts): Promise<void> {
    c.writing = true;
    while (c.waiters.length > 0) {
      const counts = { finished: c.finished, succeeded: c.succeeded, failed: c.failed, timed_out: c.timed_out };
      const waiters = c.waiters;
      Object.assign(c, { finished: 0, succeeded: 0, failed: 0, timed_out: 0, waiters: [] });
      try {
        const at = now();
        const dep = await this.repos.deployments.findOneAndUpdate(
          { _id: deploymentId, finished_at: null },
          { $inc: counts, $set: { updated_at: at } },
        );
        if (dep?.status === 'pending') {
          await this.repos.deployments.updateOne({ _id: deploymentId, status: 'pending' }, { $set: { status: 'in_progress' } });
        }
        for (const w of waiters) w.resolve(dep);
      } catch (err) {
        for (const w of waiters) w.reject(err as Error);
      }
    }
    c.writing = false;
    this.counting.delete(deploymentId);
  }

  /**
   * Resolves once a completeIfDone of this deployment that started after this
   * call has run. Asking the states whether any is left is a pass over the
   * deployment's states; a thousand outcomes arriving together each asked it
   * (O(N²)). Now the outcomes that arrive while one check runs share the next.
   */
  private checkCompletion(deploymentId: string): Promise<void> {
    let c = this.completionChecks.get(deploymentId);
    if (!c) this.completionChecks.set(deploymentId, (c = {}));
    if (c.next) return c.next;
    const checks = c;
    const next = (checks.running ?? Promise.resolve()).catch(() => undefined).then(() => {
      checks.next = undefined;
      const run = this.completeIfDone(deploymentId);
      checks.running = run;
      return run.finally(() => {
        if (checks.running !== run) return;
        checks.running = undefined;
        if (!checks.next) this.completionChecks.delete(deploymentId);
      });
    });
    checks.next = next;
    return next;
  }

  /**
   * Finishes the deployment once none of its devices is pending, in progress
   * or finalizing.
   * "Any left?" is asked of the states themselves (through their `_id` range,
   * stopping at the first live one), never of a counter a crash could have
   * skewed; the final counts are then taken exactly, once.
   */
  async completeIfDone(deploymentId: string): Promise<void> {
    const states = this.repos.deviceDeployments;
    if (await states.findOne({ ...statesOf(deploymentId), status: { $in: LIVE_DEVICE_STATUSES } })) return;
    // A final state still being finalized (its history or version not yet written) holds the completion back.
    if (await states.findOne({ ...statesOf(deploymentId), finalizing: true })) return;
    const count = (status: DeviceDeploymentStatus) => states.count({ ...statesOf(deploymentId), status });
    const [succeeded, failedOnly, timedOut] = await Promise.all([count('success'), count('failed'), count('timed_out')]);
    const failed = failedOnly + timedOut;
    const status = failed === 0 ? 'success' : 'failed';
    const at = now();
    const done = await this.repos.deployments.findOneAndUpdate(
      { _id: deploymentId, finished_at: null },
      { $set: { status, finished: succeeded + failed, succeeded, failed, timed_out: timedOut, finished_at: at, updated_at: at } },
    );
    if (!done) return;
    this.logger.info({ deploymentId, status, succeeded, failed, timedOut }, 'deployment finished');
    void this.publisher.event({
      type: 'deployment.finished', deployment_id: done._id, kind: done.kind, bundle_version: done.bundle_version, status,
      counts: { total: done.total, succeeded, failed }, at,
    });
  }

  private progressEvent(state: DeviceDeploymentDoc, deviceStatus: string, error: string | null): void {
    void this.publisher.event({
      type: 'deployment.progress', deployment_id: state.deployment_id, kind: state.kind, bundle_version: state.bundle_version,
      device_id: state.device_id, device_status: deviceStatus, error_message: error, at: now(),
    });
  }

  async list(limit = 50, filter: { running?: boolean } = {}): Promise<Record<string, unknown>[]> {
    const query = filter.running === undefined ? {} : filter.running ? { finished_at: null } : { finished_at: { $ne: null } };
    const docs = await this.repos.deployments.find(query, { sort: { created_at: -1 }, limit });
    return docs.map((d) => this.view(d));
  }

  /** Deployments and rollbacks not finished yet. */
  running(): Promise<number> {
    return this.repos.deployments.count({ finished_at: null });
  }

  async get(id: string): Promise<Record<string, unknown>> {
    const dep = await this.repos.deployments.findOne({ _id: id });
    if (!dep) throw notFound(`deployment ${id}`);
    const states = await this.repos.deviceDeployments.find(statesOf(id), { sort: { device_id: 1 } });
    return { ...this.view(dep), devices: states.map((s) => present(s, ['finalizing'])) };
  }

  async getDoc(id: string): Promise<DeploymentDoc | null> {
    return this.repos.deployments.findOne({ _id: id });
  }

  private view(d: DeploymentDoc): Record<string, unknown> {
    return { deployment_id: d._id, ...present(d) };
  }
}
