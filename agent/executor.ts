// Executes deploy and rollback commands: download, verify, extract, run,
// each phase recorded durably first, the outcome recorded before it is sent.
// Whatever happens to the agent, a command ends with exactly one recorded
// outcome, sent until the controller acknowledges it:
//   - stopped or killed before the script ran (received, downloading,
//     verifying, extracting): nothing on the device has changed, so the next
//     start resumes the command (a download continues where it stopped);
//   - killed while the script ran: the next start ends what is left of the
//     script's process group, then reports `failed` with reason `interrupted`,
//     or runs the script again if the manifest declares it `idempotent`;
//   - killed after the outcome was recorded: it is sent again on connect.
import { randomUUID } from 'node:crypto';
import { mkdir, rm, readdir, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { setTimeout as delay } from 'node:timers/promises';
import type { Logger } from 'pino';
import type { BundleCommand, CommandResult } from '../schemas/index.js';
import {
  assertTrustedSigner, downloadBundle, extractBundle, killLeftoverGroup, killTaggedGroups, processStartTime,
  removeStaleExtractions, runScript, sha256File, verifyBundleSignature, type TrustedKey,
} from './bundle/index.js';
import { ParkedError, type Pause, type PausePoint } from './pause.js';
import type { InFlight, StateFile } from './state.js';

/** In each script's environment: a value unique to that run (see InFlight.run_id). */
const RUN_ID_ENV = 'KERNEX_RUN_ID';

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
  /** Test hook (KERNEX_AGENT_TEST_PAUSE_AT); a no-op otherwise. */
  pause?: Pause;
}

type Phase = NonNullable<CommandResult['phase']>;

/** Executions of one command (the first and its resumptions) before an interruption is final. */
const MAX_ATTEMPTS = 3;
const BEFORE_SCRIPT: ReadonlySet<Phase> = new Set(['received', 'downloading', 'verifying', 'extracting']);
/** How long a stopping agent still waits for the controller to acknowledge an outcome. */
const REPORT_WAIT_WHEN_STOPPING_MS = 1000;

export class CommandExecutor {
  private queue: Promise<void> = Promise.resolve();
  /** Deployments queued or running: the same command arriving again (MQTT and HTTP, or a resend) waits for that one. */
  private waiting = new Set<string>();
  private stopping = false;
  /** Aborted when the agent starts stopping: pauses and downloads park. */
  private readonly park = new AbortController();
  /** Aborted when the stop grace is over: a running script is ended, waits for acknowledgements give up. */
  private readonly kill = new AbortController();

  constructor(private deps: ExecutorDeps) {}

  /** Commands run one at a time, in the order received. */
  enqueue(command: BundleCommand, resume?: InFlight): Promise<void> {
    if (this.stopping) {
      // The controller re-sends what is still pending when this device reconnects.
      this.deps.logger.debug({ deploymentId: command.deployment_id }, 'command ignored: the agent is stopping');
      return Promise.resolve();
    }
    const id = command.deployment_id;
    if (this.waiting.has(id)) {
      this.deps.logger.debug({ deploymentId: id }, 'duplicate command ignored: already queued or running');
      return this.queue;
    }
    this.waiting.add(id);
    this.queue = this.queue.then(() => this.handle(command, resume)).catch((err: Error) =>
      this.deps.logger.error({ err: err.message, deploymentId: id }, 'command handling failed'),
    ).finally(() => this.waiting.delete(id));
    return this.queue;
  }

  idle(): Promise<void> {
    return this.queue;
  }

  /**
   * Called once at start, before any command arrives: cleans up after a kill
   * and decides what becomes of a command that was in flight.
   */
  async recover(): Promise<void> {
    const { state, logger } = this.deps;
    const bundles = join(this.deps.dataDir, 'bundles');
    for (const version of await readdir(bundles).catch(() => [] as string[])) {
      const removed = await removeStaleExtractions(join(bundles, version, 'root'));
      if (removed.length) logger.info({ version, removed }, 'removed an extraction the agent did not finish');
    }
    const interrupted = state.state.in_flight;
    if (!interrupted) return;
    const deploymentId = interrupted.command.deployment_id;
    if (state.state.handled[deploymentId]) {
      await state.update((s) => (s.in_flight = null));
      return;
    }
    if (interrupted.script && (await killLeftoverGroup(interrupted.script.pgid, interrupted.script.start_time))) {
      logger.warn({ deploymentId, pgid: interrupted.script.pgid }, 'ended the script the previous agent process left running');
    } else if (!interrupted.script && interrupted.run_id) {
      // Killed between starting the script and recording its group: found by the tag in its environment.
      const ended = await killTaggedGroups(`${RUN_ID_ENV}=${interrupted.run_id}`);
      if (ended.length) logger.warn({ deploymentId, pgids: ended }, 'ended the script the previous agent process left running');
    }
    const attempts = interrupted.attempts ?? 1;
    const resumable = BEFORE_SCRIPT.has(interrupted.phase) || (interrupted.phase === 'running' && interrupted.idempotent === true);
    if (resumable && attempts < MAX_ATTEMPTS) {
      logger.info({ deploymentId, phase: interrupted.phase, attempt: attempts + 1 }, 'resuming the interrupted command');
      void this.enqueue(interrupted.command, interrupted);
      return;
    }
    const error = interrupted.phase === 'running' && !interrupted.idempotent
      ? `the agent stopped while the ${interrupted.command.type} script ran; it is not declared idempotent, so it was not run again`
      : `the command was interrupted ${attempts} times, the last time in the ${interrupted.phase} phase`;
    logger.warn({ deploymentId, phase: interrupted.phase }, error);
    await this.recordOutcome(interrupted.command, {
      command_id: interrupted.command.command_id, deployment_id: deploymentId, status: 'failed',
      bundle_version: interrupted.command.bundle_version, reason: 'interrupted', error_message: error,
      reported_at: new Date().toISOString(),
    });
  }

  /**
   * Stops taking commands; parks what can be resumed at once (downloads,
   * pauses, anything before the script); lets a running script finish within
   * `graceMs`, then ends it. Resolves when nothing runs any more.
   */
  async stop(graceMs: number): Promise<void> {
    this.stopping = true;
    this.park.abort(new ParkedError());
    const timer = setTimeout(() => this.kill.abort(new ParkedError()), graceMs);
    try {
      await this.queue;
    } finally {
      clearTimeout(timer);
    }
  }

  private pause(point: PausePoint, command: BundleCommand): Promise<void> {
    return this.deps.pause ? this.deps.pause(point, command.deployment_id, this.park.signal) : Promise.resolve();
  }

  private async handle(command: BundleCommand, resume?: InFlight): Promise<void> {
    const { state, logger } = this.deps;
    const done = state.state.handled[command.deployment_id];
    if (done) {
      // A redelivery (QoS 1 duplicate or controller resend): answer from the record.
      logger.debug({ deploymentId: command.deployment_id }, 'duplicate command answered from record');
      await this.sendFinal(command.deployment_id);
      return;
    }
    const started = Date.now();
    const base = { command, started_at: resume?.started_at ?? new Date(started).toISOString(), attempts: (resume?.attempts ?? 0) + 1 };
    const record = async (phase: Phase, extra: Partial<InFlight> = {}, announce = true) => {
      await state.update((s) => (s.in_flight = { ...base, phase, ...extra }));
      if (!announce) return;
      void this.deps.report({
        command_id: command.command_id, deployment_id: command.deployment_id, status: 'in_progress', phase,
        bundle_version: command.bundle_version, reported_at: new Date().toISOString(),
      }).catch(() => {});
    };
    let result: CommandResult;
    try {
      result = await this.execute(command, record, started);
    } catch (err) {
      if (err instanceof ParkedError) {
        logger.info({ deploymentId: command.deployment_id, phase: state.state.in_flight?.phase }, err.message);
        return;
      }
      result = {
        command_id: command.command_id, deployment_id: command.deployment_id, status: 'failed',
        bundle_version: command.bundle_version, error_message: (err as Error).message,
        reason: (err as { code?: string }).code ?? 'error', duration_seconds: (Date.now() - started) / 1000,
      };
    }
    result.reported_at = new Date().toISOString();
    logger.info({ deploymentId: command.deployment_id, version: command.bundle_version, status: result.status,
      error: result.error_message }, `${command.type} finished`);
    await this.recordOutcome(command, result);
    await this.pruneBundles();
    try {
      await this.pause('reporting', command);
    } catch (err) {
      if (err instanceof ParkedError) return; // recorded, unreported: sent on the next start
      throw err;
    }
    await this.sendFinal(command.deployment_id);
  }

  /** The outcome and the end of the in-flight record, in one durable write. */
  private async recordOutcome(command: BundleCommand, result: CommandResult): Promise<void> {
    await this.deps.state.update((s) => {
      s.handled[command.deployment_id] = { result, reported: false, at: new Date().toISOString() };
      s.in_flight = null;
      if (result.status === 'success') {
        s.current_bundle_version = command.bundle_version;
        s.deployed_versions = s.deployed_versions.filter((v) => v.version !== command.bundle_version);
        s.deployed_versions.push({ version: command.bundle_version, sha256: command.sha256, bundle_id: command.bundle_id });
      }
    });
  }

  /** Sends a recorded outcome, and marks it reported once acknowledged. */
  async sendFinal(deploymentId: string): Promise<void> {
    const handled = this.deps.state.state.handled[deploymentId];
    if (!handled) return;
    try {
      if (!(await this.deliver(handled.result))) {
        this.deps.logger.info({ deploymentId }, 'result not acknowledged before stopping; it is sent again on the next start');
        return;
      }
      if (!handled.reported) await this.deps.state.update((s) => (s.handled[deploymentId]!.reported = true));
    } catch (err) {
      this.deps.logger.warn({ deploymentId, err: (err as Error).message }, 'result not delivered yet; will retry');
    }
  }

  /** True once acknowledged; false when the agent stopped waiting (stopping). */
  private async deliver(result: CommandResult): Promise<boolean> {
    const sent = this.deps.report(result).then(() => true);
    const gaveUp = new AbortController();
    const giveUp = this.stopping
      ? delay(REPORT_WAIT_WHEN_STOPPING_MS, false, { signal: gaveUp.signal })
      : new Promise<false>((resolve) => {
        if (this.kill.signal.aborted) resolve(false);
        this.kill.signal.addEventListener('abort', () => resolve(false), { once: true, signal: gaveUp.signal });
      });
    try {
      return await Promise.race([sent, giveUp]);
    } finally {
      gaveUp.abort();
      giveUp.catch(() => {});
      sent.catch(() => {});
    }
  }

  /** Outcomes recorded but never acknowledged (the agent stopped in between). */
  async resendUnreported(): Promise<void> {
    for (const [id, h] of Object.entries(this.deps.state.state.handled)) if (!h.reported) await this.sendFinal(id);
  }

  private bundleDir(version: string): string {
    return join(this.deps.dataDir, 'bundles', version);
  }

  private parkIfStopping(): void {
    if (this.stopping) throw new ParkedError();
  }

  private async execute(
    command: BundleCommand,
    record: (phase: Phase, extra?: Partial<InFlight>, announce?: boolean) => Promise<void>,
    started: number,
  ): Promise<CommandResult> {
    const dir = this.bundleDir(command.bundle_version);
    const archive = join(dir, 'bundle.tar.gz');
    const root = join(dir, 'root');
    await record('received');
    await this.pause('received', command);
    const trusted = this.deps.trustedKeys ?? [];
    // Unsigned or signed by an unknown key: refused before anything is downloaded.
    if (trusted.length > 0) assertTrustedSigner(command.signature, trusted);

    // A rollback (or a repeated or resumed deploy) reuses the archive on disk when it is intact.
    const intact = await sha256File(archive).then((h) => h === command.sha256, () => false);
    if (!intact) {
      await record('downloading');
      await rm(root, { recursive: true, force: true });
      await mkdir(dir, { recursive: true });
      let paused = false;
      await downloadBundle({
        url: new URL(command.url, this.deps.server).toString(), token: this.deps.state.state.token ?? '',
        dest: archive, size: command.size, sha256: command.sha256, fetchImpl: this.deps.fetchImpl, signal: this.park.signal,
        onProgress: async () => {
          if (paused) return;
          paused = true;
          await this.pause('downloading', command);
        },
      });
    }
    // The archive on disk now matches command.sha256, so the signature over that digest covers these bytes.
    if (trusted.length > 0) {
      await record('verifying');
      const signer = verifyBundleSignature(command.sha256, command.signature, trusted);
      this.deps.logger.info({ deploymentId: command.deployment_id, keyId: signer }, 'bundle signature verified');
    }
    await this.pause('verified', command);
    this.parkIfStopping();
    await record('extracting');
    await removeStaleExtractions(root);
    const manifest = await extractBundle(archive, root, {}, { beforeCommit: () => this.pause('extracting', command) });
    const step = command.type === 'rollback' ? (manifest.rollback ?? manifest.deploy) : manifest.deploy;
    const idempotent = step.idempotent === true;
    // Once stopping, no script is started: the command resumes on the next start.
    this.parkIfStopping();
    const runId = randomUUID();
    await record('running', { idempotent, run_id: runId });
    const timeout = command.deploy_timeout ?? this.deps.deployTimeout();
    const run = await runScript({
      bundleDir: root, script: step.script, timeoutSeconds: timeout, signal: this.kill.signal,
      env: {
        KERNEX_DEPLOYMENT_ID: command.deployment_id, KERNEX_BUNDLE_VERSION: command.bundle_version, KERNEX_COMMAND: command.type,
        KERNEX_METADATA_JSON: JSON.stringify(this.deps.state.state.metadata_json ?? null),
        [RUN_ID_ENV]: runId,
      },
      onSpawn: async (pid) => {
        await this.pause('spawned', command);
        await record('running', { idempotent, run_id: runId, script: { pgid: pid, start_time: await processStartTime(pid) } }, false);
        await this.pause('running', command);
      },
    });
    const base = {
      command_id: command.command_id, deployment_id: command.deployment_id, bundle_version: command.bundle_version,
      exit_code: run.exit_code, output_tail: run.output_tail, duration_seconds: (Date.now() - started) / 1000,
    };
    if (run.aborted) {
      if (idempotent) throw new ParkedError(`stopped while ${step.script} ran; it is idempotent and runs again on the next start`);
      return { ...base, status: 'failed', reason: 'interrupted',
        error_message: `the agent was stopped while ${step.script} ran; the script was ended after the shutdown grace period` };
    }
    const ok = run.exit_code === 0 && !run.timed_out;
    return {
      ...base, status: ok ? 'success' : 'failed',
      error_message: ok ? null : run.timed_out
        ? `${step.script} timed out after ${timeout} s`
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
