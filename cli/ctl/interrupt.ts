// Ctrl-C and SIGTERM are handled from kernexctl's first line to its last.
// Adding and removing signal listeners per command left moments with no
// listener at all, where a signal took the default action: death by signal,
// with no message and no exit code for the script that ran kernexctl.

type Interrupt = (signal: NodeJS.Signals) => void;

const stack: Interrupt[] = [];

/** Installs the process-wide listeners; called once at start. */
export function handleInterrupts(): void {
  for (const signal of ['SIGINT', 'SIGTERM'] as const) {
    process.on(signal, () => {
      const current = stack.at(-1);
      // Nothing waiting to be told (or a second Ctrl-C while closing): leave now.
      if (!current) process.exit(130);
      stack.pop();
      current(signal);
    });
  }
}

/** `handler` runs on the next Ctrl-C or SIGTERM instead of an immediate exit; the returned function withdraws it. */
export function onInterrupt(handler: Interrupt): () => void {
  stack.push(handler);
  return () => {
    const i = stack.lastIndexOf(handler);
    if (i >= 0) stack.splice(i, 1);
  };
}
