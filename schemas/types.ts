// Generated from schemas/*.schema.json by schemas/generate-types.mjs. Do not edit.

/**
 * One command on kernex/devices/{id}/commands (controller to device, QoS 1).
 */

export type Command = BundleCommand | ConfigureCommand;

export interface BundleCommand {
  type: "deploy" | "rollback";
  command_id: string;
  deployment_id: string;
  bundle_id: string;
  bundle_version: string;
  sha256: string;
  size: number;
  url: string;
  issued_at: string;
  deploy_timeout?: number;
  signature?: string;
}

export interface ConfigureCommand {
  type: "configure";
  command_id: string;
  config_version: number;
  polling_interval?: number;
  heartbeat_timeout?: number;
  deploy_timeout?: number;
  log_level?: "DEBUG" | "INFO" | "WARNING" | "ERROR";
  metadata_json?: {} | null;
  issued_at?: string;
}

/**
 * Definitions shared by other schemas.
 */

export interface Common {
  [k: string]: unknown;
}

/**
 * Body of PUT /api/v1/devices/{id}/config. Numeric strings ("120") are accepted, as the earlier system sent them.
 */

export interface ConfigUpdate {
  polling_interval?: number;
  heartbeat_timeout?: number;
  deploy_timeout?: number;
  log_level?: "DEBUG" | "INFO" | "WARNING" | "ERROR";
  metadata_json?: {} | null;
}

/**
 * Body of POST /api/v1/deployments: a bundle by id or by version, and its targets.
 */

export type DeploymentRequest = {
  [k: string]: unknown;
} & {
  bundle_id?: string;
  bundle_version?: string;
  /**
   * @minItems 1
   * @maxItems 100000
   *
   * Items: A device id: also an MQTT topic segment, so no '/', '+', '#' or whitespace.
   */
  target_device_ids: string[];
  timeout_seconds?: number;
};

/**
 * kernex/devices/{id}/config (controller to device, retained): the desired configuration with its version.
 */

export interface DeviceConfigMessage {
  config_version: number;
  polling_interval: number;
  heartbeat_timeout: number;
  deploy_timeout: number;
  log_level: "DEBUG" | "INFO" | "WARNING" | "ERROR";
  metadata_json?: {} | null;
  updated_at?: string;
}

/**
 * kernex/devices/{id}/status (controller to integrators, retained).
 */

export interface DeviceStatusMessage {
  device_id: string;
  status: "online" | "offline" | "error";
  last_heartbeat?: string | null;
  bundle_version?: string | null;
  config_version?: number | null;
  changed_at?: string;
}

/**
 * kernex/events/deployments/{deployment_id} (controller to integrators): deployment created, per-device progress, finished.
 */

export interface FleetEvent {
  type: "deployment.created" | "deployment.progress" | "deployment.finished";
  deployment_id: string;
  kind?: "deploy" | "rollback";
  bundle_version?: string;
  device_id?: string;
  device_status?: string;
  status?: string;
  target_device_ids?: string[];
  counts?: {
    [k: string]: number;
  };
  error_message?: string | null;
  at: string;
}

/**
 * kernex/devices/{id}/heartbeat (device to controller), also the body of POST /api/v1/devices/{id}/heartbeat.
 */

export interface Heartbeat {
  status?: "online" | "error";
  bundle_version?: string | null;
  config_version?: number | null;
  uptime?: number;
  sent_at?: string;
  metrics?: {
    [k: string]: number | string | boolean | null;
  };
}

/**
 * manifest.json at the root of a bundle archive.
 */

export interface BundleManifest {
  version: string;
  name?: string;
  description?: string;
  deploy: Step;
  rollback?: Step;
  model?: {
    name?: string;
    version?: string;
    framework?: string;
  };
}

export interface Step {
  /**
   * Path of the script, relative to the bundle root; it must stay inside the bundle.
   */
  script: string;
  /**
   * The script may be run again after an interruption.
   */
  idempotent?: boolean;
}

/**
 * Body of POST /api/v1/devices/register.
 */

export interface RegisterRequest {
  /**
   * A device id: also an MQTT topic segment, so no '/', '+', '#' or whitespace.
   */
  device_id: string;
  public_key: string;
  enrollment_token?: string;
  signature?: string;
  timestamp?: string;
  hardware_id?: string;
  metadata?: {};
}

/**
 * Body of POST /api/v1/deployments/{id}/result (the earlier system's REST result report).
 */

export interface ResultRequest {
  /**
   * A device id: also an MQTT topic segment, so no '/', '+', '#' or whitespace.
   */
  device_id: string;
  status: string;
  error_message?: string | null;
  exit_code?: number | null;
  output_tail?: string;
  duration_seconds?: number | string | null;
  bundle_version?: string;
}

/**
 * kernex/devices/{id}/results (device to controller): progress and outcome of a deploy or rollback command.
 */

export interface CommandResult {
  command_id?: string;
  deployment_id: string;
  status: "in_progress" | "success" | "failed";
  phase?: "received" | "downloading" | "verifying" | "extracting" | "running" | "reporting";
  bundle_version?: string;
  exit_code?: number | null;
  output_tail?: string;
  error_message?: string | null;
  reason?: string;
  duration_seconds?: number;
  reported_at?: string;
}

/**
 * Body of POST /api/v1/devices/rollback.
 */

export interface RollbackRequest {
  bundle_version: string;
  /**
   * @minItems 1
   * @maxItems 100000
   *
   * Items: A device id: also an MQTT topic segment, so no '/', '+', '#' or whitespace.
   */
  target_device_ids: string[];
  timeout_seconds?: number;
}
