// Generated from schemas/*.schema.json by schemas/generate-types.mjs. Do not edit.

/**
 * Every REST error: a stable code and a sentence saying what was wrong and what to do.
 */

export interface ApiErrorBody {
  error: string;
  message: string;
}

/**
 * One line of GET /api/v1/devices/{id}/bundle-history: the outcome of one deploy or rollback on one device, written once.
 */

export interface BundleHistoryEntry {
  id: string;
  device_id: string;
  bundle_version: string;
  bundle_id: string;
  deployment_id: string;
  kind: "deploy" | "rollback";
  /**
   * rolled_back: it succeeded, and a later rollback replaced it.
   */
  status: "success" | "failed" | "rolled_back";
  error_message: string | null;
  deployed_at: string;
  duration_seconds: number | null;
  /**
   * On a successful rollback: the entry it replaced (now rolled_back).
   */
  replaced_entry_id?: string | null;
  /**
   * On a rolled_back entry: the rollback deployment that replaced it.
   */
  rolled_back_by?: string | null;
}

/**
 * A stored bundle as POST/GET /api/v1/bundles and GET /api/v1/bundles/{id}/info show it.
 */

export interface BundleView {
  id: string;
  name?: string | null;
  version: string;
  sha256: string;
  size: number;
  filename: string;
  manifest: BundleManifest;
  model_name?: string | null;
  /**
   * Detached Ed25519 signature (ed25519:<key id>:<base64>) given at upload; null when unsigned.
   */
  signature?: string | null;
  created_at: string;
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
  /**
   * Detached bundle signature, ed25519:<key id>:<base64>, when the bundle was uploaded signed.
   */
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
 * A deploy or rollback as the deployments API shows it; GET /api/v1/deployments/{id} adds each target's state in devices.
 */

export interface DeploymentView {
  deployment_id: string;
  id: string;
  kind: "deploy" | "rollback";
  bundle_id: string;
  bundle_version: string;
  target_device_ids: string[];
  status: "pending" | "in_progress" | "success" | "failed";
  total: number;
  finished: number;
  succeeded: number;
  /**
   * Devices that failed, timed-out ones included.
   */
  failed: number;
  /**
   * Devices that gave no outcome within timeout_seconds.
   */
  timed_out?: number;
  timeout_seconds?: number | null;
  /**
   * created_at + timeout_seconds; absent without a timeout.
   */
  deadline_at?: string;
  created_at: string;
  updated_at?: string;
  finished_at?: string | null;
  devices?: {
    device_id: string;
    status: "pending" | "in_progress" | "success" | "failed" | "timed_out";
    phase?: string | null;
    exit_code?: number | null;
    output_tail?: string | null;
    error_message?: string | null;
    /**
     * Why it failed: the agent's reason (timeout, interrupted, script_failed, download_failed, ...) or deployment_timeout.
     */
    reason?: string | null;
    duration_seconds?: number | null;
    started_at?: string | null;
    finished_at?: string | null;
  }[];
}

/**
 * GET/PUT /api/v1/devices/{id}/config: a device's desired configuration. version starts at 1 (the defaults) and grows by one per update.
 */

export interface DeviceConfigView {
  id: string;
  device_id: string;
  /**
   * Seconds between heartbeats.
   */
  polling_interval: number;
  /**
   * Seconds the agent waits for an HTTP heartbeat answer.
   */
  heartbeat_timeout: number;
  /**
   * Seconds a deploy or rollback script may run.
   */
  deploy_timeout: number;
  log_level: "DEBUG" | "INFO" | "WARNING" | "ERROR";
  metadata_json: {} | null;
  version: number;
  created_at: string;
  updated_at: string;
}

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
 * A device as GET /api/v1/devices and GET /api/v1/devices/{id} show it, with the freshest presence.
 */

export interface DeviceView {
  id: string;
  device_id: string;
  public_key?: string;
  status: "online" | "offline" | "error";
  /**
   * How the device last reached the controller.
   */
  connection?: "mqtt" | "http" | null;
  last_heartbeat: string | null;
  /**
   * The version of its last successful deploy or rollback.
   */
  current_bundle_version: string | null;
  /**
   * The configuration version the device reports having applied.
   */
  config_version: number | null;
  /**
   * The version of its stored configuration; null when none was ever set or read.
   */
  desired_config_version: number | null;
  /**
   * Whether the device reports the desired configuration version (null when there is no desired configuration).
   */
  config_applied: boolean | null;
  uptime?: number | null;
  metrics?: {} | null;
  hardware_id?: string | null;
  metadata?: {} | null;
  revoked_at?: string | null;
  created_at?: string;
  updated_at?: string;
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
 * GET /api/v1/summary: the fleet at a glance, counted on the controller.
 */

export interface FleetSummary {
  /**
   * Registered devices by presence, as GET /api/v1/devices shows them.
   */
  devices: {
    total: number;
    online: number;
    offline: number;
    error: number;
  };
  deployments: {
    /**
     * Deployments and rollbacks not finished yet.
     */
    running: number;
  };
}

/**
 * One command on kernex/devices/{id}/commands (controller to device, QoS 1).
 */

export interface HeartbeatResponse {
  commands: Command[];
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
 * Answer of POST /api/v1/devices/register (201 when created, 200 when the same device and key registered again).
 */

export interface RegisterResponse {
  device_id: string;
  /**
   * The device token: MQTT password and HTTP bearer token. Shown once.
   */
  token: string;
  mqtt_url: string;
  status: "registered";
  created: boolean;
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
 * Answer of POST /api/v1/deployments/{id}/result; recorded is false when an outcome was already recorded (a duplicate report).
 */

export interface ResultResponse {
  deployment_id: string;
  device_id: string;
  status: "success" | "failed";
  recorded: boolean;
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

/**
 * Answer of POST /api/v1/devices/rollback: the rollback deployment that was created and pushed.
 */

export interface RollbackResponse {
  deployment_id: string;
  status: "pending";
  kind: "rollback";
  bundle_id: string;
  bundle_version: string;
  target_device_ids: string[];
  created_at: string;
}

/**
 * Body of POST /api/v1/tokens (admin): a new API, integrator or enrollment token.
 */

export interface TokenRequest {
  role: "admin" | "operator" | "viewer" | "integrator" | "enrollment";
  name: string;
  /**
   * When the token stops working; absent: never.
   */
  expires_at?: string;
  /**
   * Alternative to expires_at: lifetime from now.
   */
  ttl_seconds?: number;
}
