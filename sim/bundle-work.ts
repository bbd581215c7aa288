// What a simulated device does with a deploy or rollback command: fetch the
// bundle with its own token and verify size and sha256 (in memory, no disk);
// or, with scripts enabled, the agent's own steps: download to disk, extract
// safely, run the script.
import { createHash } from 'node:crypto';
import { mkdir, rm } from 'node:fs/promises';
import { join } from 'node:path';
import type { BundleCommand, CommandResult } from '../schemas/index.js';
import { downloadBundle, extractBundle, runScript } from '../agent/index.js';
import { Semaphore } from './pool.js';

export class VerificationError extends Error {
  readonly code = 'bundle_verification_failed';
}

export interface BundleWorkOptions {
  /** The controller's HTTP base URL; command URLs are relative to it. */
  server: string;
  /**
   * One download per bundle for the whole simulated fleet instead of one per
   * device. Off by default: every device fetching its bundle is the load a
   * real fleet puts on the controller.
   */
  sharedDownloads: boolean;
  /** Extract the bundle and run its script (spawns a process per device). */
  runScripts: boolean;
  /** Where devices extract bundles when scripts run. */
  workDir: string;
  /** Downloads in flight at once, fleet-wide. */
  downloadConcurrency: number;
  deployTimeoutSeconds: number;
}

type Phase = NonNullable<CommandResult['phase']>;

export class BundleWork {
  private readonly downloads: Semaphore;
  private readonly shared = new Map<string, Promise<void>>();

  constructor(private readonly opts: BundleWorkOptions) {
    this.downloads = new Semaphore(opts.downloadConcurrency);
  }

  /** Executes one command for one device; resolves with the outcome to report (never rejects). */
  async execute(deviceId: string, token: string, command: BundleCommand, progress: (phase: Phase) => void): Promise<CommandResult> {
    const started = Date.now();
    const base = { command_id: command.command_id, deployment_id: command.deployment_id, bundle_version: command.bundle_version };
    progress('received');
    try {
      if (this.opts.runScripts) return { ...base, ...(await this.runScript(deviceId, token, command, progress)), duration_seconds: (Date.now() - started) / 1000 };
      progress('downloading');
      await this.fetchVerified(token, command);
      progress('verifying');
      return { ...base, status: 'success', duration_seconds: (Date.now() - started) / 1000 };
    } catch (err) {
      return {
        ...base, status: 'failed', error_message: (err as Error).message,
        reason: (err as { code?: string }).code ?? 'error', duration_seconds: (Date.now() - started) / 1000,
      };
    }
  }

  private fetchVerified(token: string, command: BundleCommand): Promise<void> {
    if (!this.opts.sharedDownloads) return this.downloads.run(() => fetchAndVerify(this.url(command), token, command));
    let once = this.shared.get(command.sha256);
    if (!once) {
      once = this.downloads.run(() => fetchAndVerify(this.url(command), token, command));
      // A failed shared download is not cached: the next device tries again.
      once.catch(() => this.shared.delete(command.sha256));
      this.shared.set(command.sha256, once);
    }
    return once;
  }

  private url(command: BundleCommand): string {
    return new URL(command.url, this.opts.server).toString();
  }

  private async runScript(deviceId: string, token: string, command: BundleCommand, progress: (phase: Phase) => void) {
    const dir = join(this.opts.workDir, deviceId, command.deployment_id);
    const archive = join(dir, 'bundle.tar.gz');
    try {
      await mkdir(dir, { recursive: true, mode: 0o700 });
      progress('downloading');
      await this.downloads.run(() =>
        downloadBundle({ url: this.url(command), token, dest: archive, size: command.size, sha256: command.sha256, retries: 3 }));
      progress('extracting');
      const manifest = await extractBundle(archive, join(dir, 'root'));
      const step = command.type === 'rollback' ? (manifest.rollback ?? manifest.deploy) : manifest.deploy;
      progress('running');
      const run = await runScript({
        bundleDir: join(dir, 'root'), script: step.script, timeoutSeconds: command.deploy_timeout ?? this.opts.deployTimeoutSeconds,
        env: { KERNEX_DEPLOYMENT_ID: command.deployment_id, KERNEX_BUNDLE_VERSION: command.bundle_version, KERNEX_COMMAND: command.type },
      });
      const ok = run.exit_code === 0 && !run.timed_out;
      return {
        status: ok ? ('success' as const) : ('failed' as const), exit_code: run.exit_code, output_tail: run.output_tail,
        error_message: ok ? null : run.timed_out ? `${step.script} timed out` : `${step.script} exited with ${run.exit_code}`,
        ...(ok ? {} : { reason: run.timed_out ? 'timeout' : 'script_failed' }),
      };
    } finally {
      // A simulated device keeps nothing: thousands of them would fill the disk.
      await rm(dir, { recursive: true, force: true });
    }
  }
}

/** Streams the bundle through sha256 without keeping it; throws unless size and digest match. */
export async function fetchAndVerify(url: string, token: string, expected: { size: number; sha256: string }): Promise<void> {
  const res = await fetch(url, { headers: { authorization: `Bearer ${token}` } });
  if (!res.ok || !res.body) {
    await res.body?.cancel();
    throw Object.assign(new Error(`bundle download refused: HTTP ${res.status}`), { code: 'download_failed' });
  }
  const hash = createHash('sha256');
  let size = 0;
  for await (const chunk of res.body) {
    size += (chunk as Uint8Array).byteLength;
    hash.update(chunk as Uint8Array);
  }
  const digest = hash.digest('hex');
  if (size !== expected.size) throw new VerificationError(`bundle is ${size} bytes, expected ${expected.size}`);
  if (digest !== expected.sha256) throw new VerificationError(`bundle sha256 is ${digest}, expected ${expected.sha256}`);
}
