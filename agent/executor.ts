// Executes deploy and rollback commands: download, verify, extract, run,
// each phase recorded durably first, the outcome recorded before it is sent.
import { mkdir, rm, readdir, stat } from 'node:fs/promises';
import { join } from 'node:path';
import type { Logger } from 'pino';
import type { BundleCommand, CommandResult } from '../schemas/index.js';
import {
  assertTrustedSigner, downloadBundle, extractBundle, runScript, sha256File, verifyBundleSignature, type TrustedKey,
} from './bundle/index.js';
import type { StateFile } from './state.js';

export interface ExecutorDeps {
  state: StateFile;
  dataDir: string;
  server: string;
  logger: Logger;
  deployTimeout: () => number;
  keepBundles: number;
  /** Sends progress and outcomes; resolves when the controller has acknowledged. */
  report: (result: CommandResult) => Promise<void>;
  /** When non-empty, only bundles signed by one of these keys are extracted. */
  trustedKeys?: TrustedKey[];
  /** HTTP client for downloads (carries a configured CA). */
  fetchImpl?: typeof fetch;
}

export class CommandExecutor {
  private queue: Promise<void> = Promise.resolve();
  /** Deployments queued or running: the same command arriving again (MQTT and HTTP, or a resend) waits for that one. */
  private waiting = new Set<string>();

  constructor(private deps: ExecutorDeps) {}

  /** Commands run one at a time, in the order received. */
  enqueue(command: BundleCommand): Promise<void> {
    const id = command.deployment_id;
    if (this.waiting.has(id)) {
      this.deps.logger.debug({ deploymentId: id }, 'duplicate command ignored: already queued or running');
      return this.queue;
    }
    this.waiting.add(id);
    this.queue = this.queue.then(() => this.handle(command)).catch((err: Error) =>
      this.deps.logger.error({ err: err.message, deploymentId: id }, 'command handling failed'),
    ).finally(() => this.waiting.delete(id));
    return this.queue;
  }

  idle(): Promise<void> {
    return this.queue;
  }

  private async handle(command: BundleCommand): Promise<void> {
    const { state, logger } = this.deps;
    const done = state.state.handled[command.deployment_id];
    if (done) {
      // A redelivery (QoS 1 duplicate or controller resend): answer from the record.
      logger.debug({ deploymentId: command.deployment_id }, 'duplicate command answered from record');
      await this.sendFinal(command.deployment_id);
      return;
    }
    const started = Date.now();
    const progress = async (phase: NonNullable<CommandResult['phase']>) => {
      await state.update((s) => (s.in_flight = { command, phase, started_at: new Date(started).toISOString() }));
      void this.deps.report({
        command_id: command.command_id, deployment_id: command.deployment_id, status: 'in_progress', phase,
        bundle_version: command.bundle_version, reported_at: new Date().toISOString(),
      }).catch(() => {});
    };
    let result: CommandResult;
    try {
      result = await this.execute(command, progress, started);
    } catch (err) {
      result = {
        command_id: command.command_id, deployment_id: command.deployment_id, status: 'failed',
        bundle_version: command.bundle_version, error_message: (err as Error).message,
        reason: (err as { code?: string }).code ?? 'error', duration_seconds: (Date.now() - started) / 1000,
      };
    }
    result.reported_at = new Date().toISOString();
    logger.info({ deploymentId: command.deployment_id, version: command.bundle_version, status: result.status,
      error: result.error_message }, `${command.type} finished`);
    await state.update((s) => {
      s.handled[command.deployment_id] = { result, reported: false, at: new Date().toISOString() };
      s.in_flight = null;
      if (result.status === 'success') {
        s.current_bundle_version = command.bundle_version;
        s.deployed_versions = s.deployed_versions.filter((v) => v.version !== command.bundle_version);
        s.deployed_versions.push({ version: command.bundle_version, sha256: command.sha256, bundle_id: command.bundle_id });
      }
    });
    await this.pruneBundles();
    await this.sendFinal(command.deployment_id);
  }

  /** Sends a recorded outcome, and marks it reported once acknowledged. */
  async sendFinal(deploymentId: string): Promise<void> {
    const handled = this.deps.state.state.handled[deploymentId];
    if (!handled) return;
    try {
      await this.deps.report(handled.result);
      if (!handled.reported) await this.deps.state.update((s) => (s.handled[deploymentId]!.reported = true));
    } catch (err) {
      this.deps.logger.warn({ deploymentId, err: (err as Error).message }, 'result not delivered yet; will retry');
    }
  }

  /** Outcomes recorded but never acknowledged (the agent stopped in between). */
  async resendUnreported(): Promise<void> {
    for (const [id, h] of Object.entries(this.deps.state.state.handled)) if (!h.reported) await this.sendFinal(id);
  }

  private bundleDir(version: string): string {
    return join(this.deps.dataDir, 'bundles', version);
  }

  private async execute(
    command: BundleCommand,
    progress: (phase: NonNullable<CommandResult['phase']>) => Promise<void>,
    started: number,
  ): Promise<CommandResult> {
    const dir = this.bundleDir(command.bundle_version);
    const archive = join(dir, 'bundle.tar.gz');
    const root = join(dir, 'root');
    await progress('received');
    const trusted = this.deps.trustedKeys ?? [];
    // Unsigned or signed by an unknown key: refused before anything is downloaded.
    if (trusted.length > 0) assertTrustedSigner(command.signature, trusted);

    // A rollback (or a repeated deploy) reuses the archive on disk when it is intact.
    const intact = await sha256File(archive).then((h) => h === command.sha256, () => false);
    if (!intact) {
      await progress('downloading');
      await rm(root, { recursive: true, force: true });
      await mkdir(dir, { recursive: true });
      await downloadBundle({
        url: new URL(command.url, this.deps.server).toString(), token: this.deps.state.state.token ?? '',
        dest: archive, size: command.size, sha256: command.sha256, fetchImpl: this.deps.fetchImpl,
      });
    }
    // The archive on disk now matches command.sha256, so the signature over that digest covers these bytes.
    if (trusted.length > 0) {
      await progress('verifying');
      const signer = verifyBundleSignature(command.sha256, command.signature, trusted);
      this.deps.logger.info({ deploymentId: command.deployment_id, keyId: signer }, 'bundle signature verified');
    }
    await progress('extracting');
    const manifest = await extractBundle(archive, root);
    const step = command.type === 'rollback' ? (manifest.rollback ?? manifest.deploy) : manifest.deploy;
    await progress('running');
    const run = await runScript({
      bundleDir: root, script: step.script, timeoutSeconds: command.deploy_timeout ?? this.deps.deployTimeout(),
      env: { KERNEX_DEPLOYMENT_ID: command.deployment_id, KERNEX_BUNDLE_VERSION: command.bundle_version, KERNEX_COMMAND: command.type },
    });
    const ok = run.exit_code === 0 && !run.timed_out;
    return {
      command_id: command.command_id, deployment_id: command.deployment_id, status: ok ? 'success' : 'failed',
      bundle_version: command.bundle_version, exit_code: run.exit_code, output_tail: run.output_tail,
      duration_seconds: (Date.now() - started) / 1000,
      error_message: ok ? null : run.timed_out
        ? `${step.script} timed out after ${command.deploy_timeout ?? this.deps.deployTimeout()} s`
        : `${step.script} exited with ${run.exit_code ?? `signal ${run.signal}`}`,
      reason: ok ? undefined : run.timed_out ? 'timeout' : 'script_failed',
    };
  }

  /** Keeps the bundles of the last few successful deploys, and the one running now. */
  private async pruneBundles(): Promise<void> {
    const s = this.deps.state.state;
    const keep = new Set(s.deployed_versions.slice(-this.deps.keepBundles).map((v) => v.version));
    if (s.current_bundle_version) keep.add(s.current_bundle_version);
    const base = join(this.deps.dataDir, 'bundles');
    const entries = await readdir(base).catch(() => [] as string[]);
    for (const name of entries) {
      if (keep.has(name)) continue;
      const st = await stat(join(base, name)).catch(() => null);
      if (st?.isDirectory()) await rm(join(base, name), { recursive: true, force: true });
    }
    if (s.deployed_versions.length > this.deps.keepBundles * 4) {
      await this.deps.state.update((st) => (st.deployed_versions = st.deployed_versions.slice(-this.deps.keepBundles * 4)));
    }
  }
}
