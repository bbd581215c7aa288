// Exit codes and the one kind of error kernexctl reports: a sentence that says
// what went wrong and what to do, never a stack trace (unless --verbose).

/** Documented in `kernexctl --help` and the README; scripts rely on them. */
export const EXIT = {
  /** Everything asked for was done (a deployment: every device succeeded). */
  ok: 0,
  /** It ran and failed: a deployment or rollback finished with failed or timed-out devices; a controller error. */
  failed: 1,
  /** Usage: bad arguments, invalid manifest or bundle, a request the controller refused (400, 404, 409). */
  usage: 2,
  /** The controller (REST) or its MQTT broker cannot be reached. */
  unreachable: 3,
  /** No token, a refused token (401), or a role that may not do this (403). */
  auth: 4,
  /** --wait gave up after --timeout; the deployment is still running on the controller. */
  timeout: 5,
  /** Ctrl-C while waiting. */
  interrupted: 130,
} as const;

export type ExitCode = (typeof EXIT)[keyof typeof EXIT];

export class CtlError extends Error {
  constructor(message: string, readonly exitCode: ExitCode = EXIT.failed, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'CtlError';
  }
}

export const usageError = (message: string) => new CtlError(message, EXIT.usage);
