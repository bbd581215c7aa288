// The frame around every command: build the context, run, close, and turn
// any failure into one line on stderr and an exit code.
import { Context, type GlobalArgs } from './context.js';
import { CtlError, EXIT, usageError } from './errors.js';

export function reportError(err: unknown, verbose: boolean): number {
  if (err instanceof CtlError) {
    process.stderr.write(`kernexctl: ${err.message}\n`);
    if (verbose && err.cause) process.stderr.write(`${(err.cause as Error).stack ?? String(err.cause)}\n`);
    return err.exitCode;
  }
  const e = err as Error;
  process.stderr.write(`kernexctl: unexpected error: ${e?.message ?? String(err)}` +
    `${verbose ? '' : ' (run again with --verbose for details)'}\n`);
  if (verbose) process.stderr.write(`${e?.stack ?? ''}\n`);
  return EXIT.failed;
}

/** Wraps a command body; it returns its exit code (default 0). */
export function run<A extends GlobalArgs>(body: (ctx: Context, argv: A) => Promise<number | void>) {
  return async (argv: A): Promise<void> => {
    let ctx: Context | undefined;
    let code: number;
    try {
      ctx = new Context(argv);
      code = (await body(ctx, argv)) ?? EXIT.ok;
    } catch (err) {
      code = reportError(err, Boolean(argv.verbose));
    }
    await ctx?.close();
    process.exitCode = code;
  };
}

/** "a,b c" and repeated flags → ["a", "b", "c"], without duplicates. */
export function splitList(value: string | string[] | undefined): string[] {
  const parts = (Array.isArray(value) ? value : value === undefined ? [] : [value])
    .flatMap((v) => String(v).split(/[,\s]+/))
    .filter(Boolean);
  return [...new Set(parts)];
}

export function positiveInt(value: unknown, name: string): number {
  const n = Number(value);
  if (!Number.isInteger(n) || n < 0) throw usageError(`${name} must be a whole number of seconds (0 or more), got '${String(value)}'`);
  return n;
}

/** A device id as the API accepts it; refused locally so a typo does not become a confusing URL. */
export function deviceId(value: unknown): string {
  const s = String(value);
  if (!/^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$/.test(s)) {
    throw usageError(`'${s}' is not a valid device id (letters, digits, '.', '_', ':', '-'; at most 128)`);
  }
  return s;
}

export const deviceNotFound = (id: string) => () =>
  `device ${id} not found: \`kernexctl devices list\` shows the registered devices`;
