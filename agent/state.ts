// The agent's durable memory: credentials, what it runs, and the outcome of
// every command it handled, so a redelivered command is answered, not re-run.
// Written with write-then-rename and fsync, so a power cut leaves either the
// old or the new file, never half of one.
import { open, readFile, rename, mkdir } from 'node:fs/promises';
import { dirname, join } from 'node:path';
import type { BundleCommand, CommandResult } from '../schemas/index.js';

export interface HandledCommand {
  result: CommandResult;
  /** The controller acknowledged the final result (PUBACK or HTTP 200). */
  reported: boolean;
  at: string;
}

export interface InFlight {
  command: BundleCommand;
  phase: NonNullable<CommandResult['phase']>;
  started_at: string;
  /** Executions started for this command; a restart that finds it here resumes it, a bounded number of times. */
  attempts?: number;
  /** The manifest declares the step's script safe to run again (known from the `running` phase on). */
  idempotent?: boolean;
  /** The running script's process group, so a restart can end what the killed agent left running. */
  script?: { pgid: number; start_time: number | null };
  /**
   * Put in the script's environment as KERNEX_RUN_ID before it starts: finds
   * what a killed agent left running before it could record `script`.
   */
  run_id?: string;
}

export interface AgentState {
  device_id: string;
  token: string | null;
  mqtt_url: string | null;
  current_bundle_version: string | null;
  config_version: number;
  polling_interval: number | null;
  /** Seconds an HTTP request to the controller may take (set by configuration; absent in older state files). */
  heartbeat_timeout?: number | null;
  deploy_timeout: number | null;
  log_level: string | null;
  /** The configuration's metadata_json, given to scripts as KERNEX_METADATA_JSON (absent in older state files). */
  metadata_json?: Record<string, unknown> | null;
  /** Successful deploys, newest last: which bundle dirs to keep for rollback. */
  deployed_versions: Array<{ version: string; sha256: string; bundle_id: string }>;
  handled: Record<string, HandledCommand>;
  in_flight: InFlight | null;
}

const MAX_HANDLED = 500;

export class StateFile {
  private writing: Promise<void> = Promise.resolve();

  private constructor(readonly path: string, public state: AgentState) {}

  static async open(dataDir: string, deviceId: string): Promise<StateFile> {
    const path = join(dataDir, 'state.json');
    await mkdir(dataDir, { recursive: true, mode: 0o700 });
    let state: AgentState;
    try {
      state = JSON.parse(await readFile(path, 'utf8')) as AgentState;
      if (state.device_id !== deviceId) {
        throw new Error(`the data dir ${dataDir} belongs to device ${state.device_id}, not ${deviceId}`);
      }
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
      state = {
        device_id: deviceId, token: null, mqtt_url: null, current_bundle_version: null, config_version: 0,
        polling_interval: null, heartbeat_timeout: null, deploy_timeout: null, log_level: null, deployed_versions: [], handled: {}, in_flight: null,
      };
    }
    return new StateFile(path, state);
  }

  /** Applies `change` and makes it durable before resolving. */
  update(change: (s: AgentState) => void): Promise<void> {
    change(this.state);
    const ids = Object.keys(this.state.handled);
    if (ids.length > MAX_HANDLED) {
      const oldest = ids.sort((a, b) => this.state.handled[a]!.at.localeCompare(this.state.handled[b]!.at));
      for (const id of oldest.slice(0, ids.length - MAX_HANDLED)) delete this.state.handled[id];
    }
    const snapshot = JSON.stringify(this.state, null, 2);
    this.writing = this.writing.then(() => writeDurably(this.path, snapshot));
    return this.writing;
  }
}

async function writeDurably(path: string, content: string): Promise<void> {
  const tmp = `${path}.tmp`;
  const fh = await open(tmp, 'w', 0o600);
  try {
    await fh.writeFile(content);
    await fh.sync();
  } finally {
    await fh.close();
  }
  await rename(tmp, path);
  const dir = await open(dirname(path), 'r');
  try {
    await dir.sync();
  } finally {
    await dir.close();
  }
}
