// The messages between the fan-out benchmark and its receiving processes
// (IPC of a forked child): a request with an id, answered once.
export type Request = { id: number } & (
  | { op: 'init'; server: string; credentials: unknown[] }
  | { op: 'connect'; target: unknown }
  | { op: 'clock' }
  /** The next round: `expect` of this process's devices get the command; '*' takes any command id. */
  | { op: 'arm'; commandId: string; expect: number }
  /** Resolves once every expected device has the command, or after `timeoutMs`, with the receipt times. */
  | { op: 'collect'; timeoutMs: number }
  | { op: 'settle' }
  | { op: 'end' }
);

export interface Reply {
  id: number;
  result?: unknown;
  error?: string;
}

const OPS = new Set(['init', 'connect', 'clock', 'arm', 'collect', 'settle', 'end']);

export function isRequest(m: unknown): m is Request {
  if (typeof m !== 'object' || m === null) return false;
  const r = m as Record<string, unknown>;
  if (typeof r.id !== 'number' || typeof r.op !== 'string' || !OPS.has(r.op)) return false;
  switch (r.op) {
    case 'init': return typeof r.server === 'string' && Array.isArray(r.credentials) && r.credentials.every(isCredentials);
    case 'connect': return typeof r.target === 'object' && r.target !== null;
    case 'arm': return typeof r.commandId === 'string' && typeof r.expect === 'number';
    case 'collect': return typeof r.timeoutMs === 'number';
    default: return true;
  }
}

function isCredentials(c: unknown): boolean {
  const o = c as Record<string, unknown> | null;
  return typeof o === 'object' && o !== null && typeof o.device_id === 'string' && typeof o.token === 'string';
}

export function isReply(m: unknown): m is Reply {
  return typeof m === 'object' && m !== null && typeof (m as Record<string, unknown>).id === 'number';
}
