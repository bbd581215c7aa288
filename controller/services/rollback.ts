// Rollbacks: return devices to a bundle version that once worked on each of
// them. Checked first, then created as a deployment of kind `rollback`, which
// pushes a `rollback` command to every target.
import type { RollbackRequest, RollbackResponse } from '../../schemas/index.js';
import { badRequest } from '../errors.js';
import type { BundleService } from './bundles.js';
import type { DeploymentService } from './deployments.js';
import type { DeviceService } from './devices.js';
import type { HistoryService } from './history.js';

/** At most this many ids are named in an error message; the rest are counted. */
const NAMED_IDS = 20;

export function listIds(ids: string[]): string {
  const named = ids.slice(0, NAMED_IDS).join(', ');
  return ids.length > NAMED_IDS ? `${named} and ${ids.length - NAMED_IDS} more` : named;
}

export class RollbackService {
  constructor(
    private bundles: BundleService,
    private devices: DeviceService,
    private history: HistoryService,
    private deployments: DeploymentService,
  ) {}

  /**
   * Refuses (400, nothing created) when the version does not exist, a target
   * does not exist, or a target never ran that version successfully (an entry
   * `success`, or `rolled_back`: it worked until something replaced it).
   */
  async create(req: RollbackRequest): Promise<RollbackResponse> {
    const version = req.bundle_version;
    const bundle = await this.bundles.byVersion(version);
    if (!bundle) {
      throw badRequest(`bundle version ${version} does not exist; GET /api/v1/bundles lists the versions there are`, 'unknown_bundle');
    }
    const ids = req.target_device_ids;
    const missing = await this.devices.missing(ids);
    if (missing.length) throw badRequest(`unknown device(s): ${listIds(missing)}`, 'unknown_device');
    const never = await this.history.withoutSuccess(ids, version);
    if (never.length) {
      throw badRequest(
        `device(s) ${listIds(never)} never ran version ${version} successfully, so there is nothing to roll back to; ` +
          'GET /api/v1/devices/{id}/bundle-history shows the versions that worked there',
        'no_successful_deployment',
      );
    }
    const dep = await this.deployments.create({
      bundle, targetDeviceIds: ids, kind: 'rollback', timeoutSeconds: req.timeout_seconds,
    });
    return {
      deployment_id: dep._id, status: 'pending', kind: 'rollback', bundle_id: dep.bundle_id,
      bundle_version: dep.bundle_version, target_device_ids: dep.target_device_ids, created_at: dep.created_at,
    };
  }
}
