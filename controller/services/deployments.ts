// Deployments and rollbacks: create them, push their commands, record each
// device's outcome exactly once, and re-send what is still pending when a
// device comes back.
import { randomUUID } from 'node:crypto';
import type { Logger } from 'pino';
import type { BundleCommand, CommandResult } from '../../schemas/index.js';
import type {
  BundleDoc, DeploymentDoc, DeploymentKind, DeviceDeploymentDoc, DeviceDeploymentStatus, HistoryDoc, Repositories,
} from '../model.js';
import { FINAL_DEVICE_STATUSES, now, present } from '../model.js';
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

/** What recording a result did, for the caller's logs and tests. */
export type RecordOutcome = 'recorded' | 'progress' | 'duplicate' | 'unknown';

const stateId = (deploymentId: string, deviceId: string) => `${deploymentId}:${deviceId}`;

export class DeploymentService {
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
      finished: 0, succeeded: 0, failed: 0, timeout_seconds: input.timeoutSeconds ?? null,
      created_at: at, updated_at: at, finished_at: null,
    };
    const states: DeviceDeploymentDoc[] = input.targetDeviceIds.map((deviceId) => ({
      _id: stateId(deployment._id, deviceId), deployment_id: deployment._id, device_id: deviceId, kind: input.kind,
      bundle_id: input.bundle._id, bundle_version: input.bundle.version, status: 'pending', phase: null,
      exit_code: null, output_tail: null, error_message: null, created_at: at, started_at: null, finished_at: null,
      duration_seconds: null, updated_at: at,
    }));
    // States first: a deployment is only visible once every target has its state.
    await this.repos.deviceDeployments.insertMany(states);
    await this.repos.deployments.insertOne(deployment);
    this.logger.info({ deploymentId: deployment._id, kind: input.kind, version: input.bundle.version, targets: states.length },
      'deployment created');
    void this.publisher.event({
      type: 'deployment.created', deployment_id: deployment._id, kind: input.kind, bundle_version: deployment.bundle_version,
      target_device_ids: deployment.target_device_ids, status: deployment.status, at,
    });
    // Fan out without waiting device by device; a device that is offline gets
    // it from its persistent session, or from resendPending when it returns.
    const command = this.command(deployment, input.bundle);
    await Promise.all(
      input.targetDeviceIds.map((deviceId) =>
        this.publisher.command(deviceId, command).catch((err: Error) =>
          this.logger.warn({ deviceId, err: err.message }, 'command not published; it is re-sent when the device reconnects'),
        ),
      ),
    );
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
    const states = await this.repos.deviceDeployments.find(
      { device_id: deviceId, status: { $in: ['pending', 'in_progress'] } },
      { sort: { created_at: 1 } },
    );
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
      if (res.matched === 0) return 'duplicate';
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
          error_message: result.error_message ?? null, duration_seconds: result.duration_seconds ?? null,
          finished_at: at, updated_at: at, started_at: state.started_at ?? at,
        },
      },
    );
    if (!updated) {
      // Already final: the device re-sent its outcome. Still make sure the
      // history and counters exist, in case an earlier attempt stopped halfway.
      const current = await this.repos.deviceDeployments.findOne({ _id: id });
      if (current && FINAL_DEVICE_STATUSES.includes(current.status)) {
        await this.writeHistory(current, current.status === 'success' ? 'success' : 'failed', result);
      }
      return 'duplicate';
    }
    await this.writeHistory(updated, finalStatus === 'success' ? 'success' : 'failed', result);
    if (finalStatus === 'success') await this.devices.setBundleVersion(deviceId, state.bundle_version);
    await this.countFinished(updated);
    this.progressEvent(updated, finalStatus, result.error_message ?? null);
    return 'recorded';
  }

  private async writeHistory(state: DeviceDeploymentDoc, status: 'success' | 'failed', result: CommandResult): Promise<void> {
    const entry: HistoryDoc = {
      _id: state._id, device_id: state.device_id, bundle_version: state.bundle_version, bundle_id: state.bundle_id,
      deployment_id: state.deployment_id, kind: state.kind, status, error_message: result.error_message ?? null,
      deployed_at: state.finished_at ?? now(), duration_seconds: result.duration_seconds ?? null,
    };
    await this.history.record(entry);
  }

  private async countFinished(state: DeviceDeploymentDoc): Promise<void> {
    const at = now();
    const dep = await this.repos.deployments.findOneAndUpdate(
      { _id: state.deployment_id },
      { $inc: { finished: 1, succeeded: state.status === 'success' ? 1 : 0, failed: state.status === 'success' ? 0 : 1 },
        $set: { updated_at: at } },
    );
    if (!dep) return;
    if (dep.finished >= dep.total) {
      const status = dep.failed === 0 ? 'success' : 'failed';
      const done = await this.repos.deployments.findOneAndUpdate(
        { _id: dep._id, finished_at: null },
        { $set: { status, finished_at: at, updated_at: at } },
      );
      if (done) {
        this.logger.info({ deploymentId: dep._id, status, succeeded: dep.succeeded, failed: dep.failed }, 'deployment finished');
        void this.publisher.event({
          type: 'deployment.finished', deployment_id: dep._id, kind: dep.kind, bundle_version: dep.bundle_version, status,
          counts: { total: dep.total, succeeded: dep.succeeded, failed: dep.failed }, at,
        });
      }
    } else if (dep.status === 'pending') {
      await this.repos.deployments.updateOne({ _id: dep._id, status: 'pending' }, { $set: { status: 'in_progress' } });
    }
  }

  private progressEvent(state: DeviceDeploymentDoc, deviceStatus: string, error: string | null): void {
    void this.publisher.event({
      type: 'deployment.progress', deployment_id: state.deployment_id, kind: state.kind, bundle_version: state.bundle_version,
      device_id: state.device_id, device_status: deviceStatus, error_message: error, at: now(),
    });
  }

  async list(limit = 50): Promise<Record<string, unknown>[]> {
    const docs = await this.repos.deployments.find({}, { sort: { created_at: -1 }, limit });
    return docs.map((d) => this.view(d));
  }

  async get(id: string): Promise<Record<string, unknown>> {
    const dep = await this.repos.deployments.findOne({ _id: id });
    if (!dep) throw notFound(`deployment ${id}`);
    const states = await this.repos.deviceDeployments.find({ deployment_id: id }, { sort: { device_id: 1 } });
    return { ...this.view(dep), devices: states.map((s) => present(s)) };
  }

  async getDoc(id: string): Promise<DeploymentDoc | null> {
    return this.repos.deployments.findOne({ _id: id });
  }

  private view(d: DeploymentDoc): Record<string, unknown> {
    return { deployment_id: d._id, ...present(d) };
  }
}
