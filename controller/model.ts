// The stored documents. Field names follow the REST API (and the earlier
// system's documents); `_id` is a UUID or a key derived from natural ids.
import type { StoredDocument, Store, Collection } from './store/index.js';
import type { BundleManifest } from '../schemas/index.js';
import type { Role } from '../broker/index.js';

export type DeviceStatus = 'online' | 'offline' | 'error';

export interface DeviceDoc extends StoredDocument {
  device_id: string;
  public_key: string;
  token_hash: string | null;
  status: DeviceStatus;
  /** How the device last reached us: a held MQTT connection or HTTP polling. */
  connection: 'mqtt' | 'http' | null;
  /** The controller instance holding the device's MQTT connection (or that held it last). */
  mqtt_instance?: string | null;
  /** Incremented by every MQTT connection; writes about a connection are conditional on it. */
  mqtt_generation?: number;
  last_heartbeat: string | null;
  current_bundle_version: string | null;
  config_version: number | null;
  uptime: number | null;
  metrics: Record<string, unknown> | null;
  hardware_id: string | null;
  metadata: Record<string, unknown> | null;
  revoked_at: string | null;
  /** Timestamp of the newest registration proof accepted; older ones are refused (replay). */
  proof_at?: string | null;
  created_at: string;
  updated_at: string;
}

export interface BundleDoc extends StoredDocument {
  name: string | null;
  version: string;
  sha256: string;
  size: number;
  filename: string;
  manifest: BundleManifest;
  model_name: string | null;
  /** Detached Ed25519 signature (ed25519:<key id>:<base64>) given at upload, carried in commands. */
  signature?: string | null;
  created_at: string;
}

export type DeploymentKind = 'deploy' | 'rollback';
export type DeploymentStatus = 'pending' | 'in_progress' | 'success' | 'failed';
export type DeviceDeploymentStatus = 'pending' | 'in_progress' | 'success' | 'failed' | 'timed_out';
export const FINAL_DEVICE_STATUSES: DeviceDeploymentStatus[] = ['success', 'failed', 'timed_out'];
export const LIVE_DEVICE_STATUSES: DeviceDeploymentStatus[] = ['pending', 'in_progress'];

export interface DeploymentDoc extends StoredDocument {
  kind: DeploymentKind;
  bundle_id: string;
  bundle_version: string;
  target_device_ids: string[];
  status: DeploymentStatus;
  total: number;
  finished: number;
  succeeded: number;
  /** Devices that failed, timed-out ones included. */
  failed: number;
  /** Of the failed, those that gave no final result within `timeout_seconds`. */
  timed_out?: number;
  /** Seconds from creation a device has to report its outcome; then it is `timed_out`. */
  timeout_seconds: number | null;
  /** created_at + timeout_seconds; absent without a timeout (so the sparse index holds only these). */
  deadline_at?: string;
  created_at: string;
  updated_at: string;
  finished_at: string | null;
}

/** Per-device state of one deployment; `_id` is `${deployment_id}:${device_id}`. */
export interface DeviceDeploymentDoc extends StoredDocument {
  deployment_id: string;
  device_id: string;
  kind: DeploymentKind;
  bundle_id: string;
  bundle_version: string;
  status: DeviceDeploymentStatus;
  phase: string | null;
  exit_code: number | null;
  output_tail: string | null;
  error_message: string | null;
  /** Why it failed, as the agent says it (`timeout`, `interrupted`, `script_failed`, ...) or `deployment_timeout`. */
  reason?: string | null;
  created_at: string;
  started_at: string | null;
  finished_at: string | null;
  duration_seconds: number | null;
  updated_at: string;
  /**
   * Set in the same write that makes the state final, unset once its history
   * entry and the device's version are written; the deployment completes only
   * when no state is live or finalizing. A crash or a store failure in between
   * leaves it set, and the device's re-sent result or the sweeper completes the rest.
   */
  finalizing?: boolean;
}

export type HistoryStatus = 'success' | 'failed' | 'rolled_back';

/** One line of a device's bundle history; `_id` is `${deployment_id}:${device_id}`, so it is written once. */
export interface HistoryDoc extends StoredDocument {
  device_id: string;
  bundle_version: string;
  bundle_id: string;
  deployment_id: string;
  kind: DeploymentKind;
  status: HistoryStatus;
  error_message: string | null;
  deployed_at: string;
  duration_seconds: number | null;
  /** On a successful rollback: the entry it replaced. Chosen when the entry is first written, so a retry marks the same one. */
  replaced_entry_id?: string | null;
  /** On a `rolled_back` entry: the rollback deployment that replaced it. */
  rolled_back_by?: string | null;
}

export interface DeviceConfigDoc extends StoredDocument {
  device_id: string;
  polling_interval: number;
  heartbeat_timeout: number;
  deploy_timeout: number;
  log_level: 'DEBUG' | 'INFO' | 'WARNING' | 'ERROR';
  metadata_json: Record<string, unknown> | null;
  version: number;
  created_at: string;
  updated_at: string;
}

export interface TokenDoc extends StoredDocument {
  token_hash: string;
  role: Role | 'enrollment';
  name: string;
  created_at: string;
  expires_at: string | null;
  revoked_at: string | null;
  /** Name of the token that created it (null for the bootstrap credentials). */
  created_by?: string | null;
}

export interface AuditDoc extends StoredDocument {
  at: string;
  actor: string;
  action: string;
  target: string | null;
  details: Record<string, unknown> | null;
}

export interface Repositories {
  devices: Collection<DeviceDoc>;
  bundles: Collection<BundleDoc>;
  deployments: Collection<DeploymentDoc>;
  deviceDeployments: Collection<DeviceDeploymentDoc>;
  bundleHistory: Collection<HistoryDoc>;
  deviceConfigs: Collection<DeviceConfigDoc>;
  tokens: Collection<TokenDoc>;
  audit: Collection<AuditDoc>;
}

/** Opens the collections and creates the indexes their queries need. */
export async function openRepositories(store: Store): Promise<Repositories> {
  const repos: Repositories = {
    devices: store.collection<DeviceDoc>('devices'),
    bundles: store.collection<BundleDoc>('bundles'),
    deployments: store.collection<DeploymentDoc>('deployments'),
    deviceDeployments: store.collection<DeviceDeploymentDoc>('deployment_devices'),
    bundleHistory: store.collection<HistoryDoc>('device_bundle_history'),
    deviceConfigs: store.collection<DeviceConfigDoc>('device_configs'),
    tokens: store.collection<TokenDoc>('tokens'),
    audit: store.collection<AuditDoc>('audit_log'),
  };
  await Promise.all([
    repos.devices.ensureIndex({ fields: { device_id: 1 }, unique: true }),
    repos.devices.ensureIndex({ fields: { token_hash: 1 } }),
    // Presence: devices an instance held (reset on restart; swept when it is gone).
    repos.devices.ensureIndex({ fields: { connection: 1, status: 1, mqtt_instance: 1 } }),
    repos.bundles.ensureIndex({ fields: { version: 1 }, unique: true }),
    repos.deployments.ensureIndex({ fields: { created_at: -1 } }),
    repos.deviceDeployments.ensureIndex({ fields: { deployment_id: 1, device_id: 1 } }),
    repos.deviceDeployments.ensureIndex({ fields: { device_id: 1, status: 1 } }),
    // Finalizations a crash interrupted (few at any time), and deployments whose timeout is due.
    repos.deviceDeployments.ensureIndex({ fields: { finalizing: 1 }, sparse: true }),
    repos.deployments.ensureIndex({ fields: { deadline_at: 1 }, sparse: true }),
    repos.bundleHistory.ensureIndex({ fields: { device_id: 1, deployed_at: -1 } }),
    repos.deviceConfigs.ensureIndex({ fields: { device_id: 1 }, unique: true }),
    repos.tokens.ensureIndex({ fields: { token_hash: 1 }, unique: true }),
  ]);
  return repos;
}

export const now = (): string => new Date().toISOString();

/**
 * Filter for all per-device states of a deployment: a range of their `_id`s
 * (`${deployment_id}:${device_id}`), served by the primary index of every
 * backend, with no index on a field shared by thousands of states.
 */
export const statesOf = (deploymentId: string) => ({ _id: { $gte: `${deploymentId}:`, $lt: `${deploymentId};` } });

/** A stored document as the API shows it: `_id` becomes `id`, secrets dropped. */
export function present<T extends StoredDocument>(doc: T, omit: string[] = []): Record<string, unknown> {
  const { _id, ...rest } = doc as T & Record<string, unknown>;
  for (const key of omit) delete rest[key];
  return { id: _id, ...rest };
}
