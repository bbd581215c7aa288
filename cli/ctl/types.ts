// What the REST API answers, as kernexctl reads it. The CLI only displays
// these and passes them through for --json, so a field it does not know is
// kept, and one that is missing shows as "-".

export type DeviceStatus = 'online' | 'offline' | 'error';
export const DEVICE_STATUSES: DeviceStatus[] = ['online', 'offline', 'error'];

export interface Device {
  device_id: string;
  status: DeviceStatus;
  connection?: 'mqtt' | 'http' | null;
  last_heartbeat?: string | null;
  current_bundle_version?: string | null;
  config_version?: number | null;
  uptime?: number | null;
  hardware_id?: string | null;
  created_at?: string;
  [field: string]: unknown;
}

export interface Bundle {
  id: string;
  name?: string | null;
  version: string;
  sha256: string;
  size: number;
  filename?: string;
  /** Detached signature given at upload, when the bundle was signed. */
  signature?: string | null;
  created_at?: string;
  [field: string]: unknown;
}

export type DeviceDeploymentStatus = 'pending' | 'in_progress' | 'success' | 'failed' | 'timed_out';
export const FINAL_STATUSES: ReadonlySet<string> = new Set(['success', 'failed', 'timed_out']);

export interface DeviceDeployment {
  device_id: string;
  status: DeviceDeploymentStatus;
  phase?: string | null;
  exit_code?: number | null;
  error_message?: string | null;
  output_tail?: string | null;
  duration_seconds?: number | null;
  finished_at?: string | null;
  [field: string]: unknown;
}

export interface Deployment {
  deployment_id: string;
  kind?: 'deploy' | 'rollback';
  bundle_id?: string;
  bundle_version: string;
  target_device_ids: string[];
  status: string;
  total?: number;
  finished?: number;
  succeeded?: number;
  failed?: number;
  created_at?: string;
  finished_at?: string | null;
  devices?: DeviceDeployment[];
  [field: string]: unknown;
}

export interface HistoryEntry {
  id?: string;
  device_id: string;
  bundle_version: string;
  bundle_id?: string;
  deployment_id?: string;
  kind?: string;
  status: string;
  error_message?: string | null;
  deployed_at: string;
  duration_seconds?: number | string | null;
  [field: string]: unknown;
}

export interface DeviceConfig {
  device_id?: string;
  polling_interval: number;
  heartbeat_timeout: number;
  deploy_timeout: number;
  log_level: string;
  metadata_json?: Record<string, unknown> | null;
  version: number;
  updated_at?: string;
  [field: string]: unknown;
}

export interface Health {
  status: string;
  version: string;
  mqtt_url?: string;
  [field: string]: unknown;
}
