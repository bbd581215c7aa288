// Shell completion: yargs completes commands and options; device ids and
// bundle versions come from the controller (best effort, quickly, silently).
import { ApiClient } from './api.js';
import { resolveCredentials } from './credentials.js';
import type { Bundle, Device } from './types.js';

type Kind = 'device' | 'version';

/** What the word being completed names, from the words before it. */
export function completionKind(args: string[]): Kind | null {
  const before = args.slice(0, -1);
  const prev = before[before.length - 1];
  if (prev === '--devices' || prev === '-d' || prev === '--device') return 'device';
  const words = before.filter((w) => !w.startsWith('-'));
  const [group, sub] = words;
  if (words.length === 2 && (group === 'devices' || group === 'device') && (sub === 'get' || sub === 'history')) return 'device';
  if (words.length === 2 && group === 'config' && (sub === 'get' || sub === 'set')) return 'device';
  if (words.length === 1 && (group === 'deploy' || group === 'rollback')) return 'version';
  if (words.length === 2 && (group === 'bundles' || group === 'bundle') && sub === 'get') return 'version';
  return null;
}

export async function completeNames(kind: Kind, current: string): Promise<string[]> {
  const creds = resolveCredentials({});
  if (!creds.token) return [];
  const api = new ApiClient({ ...creds, trace: undefined });
  const names = kind === 'device'
    ? (await api.get<Device[]>('/devices')).map((d) => d.device_id)
    : (await api.get<Bundle[]>('/bundles')).map((b) => b.version);
  return names.filter((n) => n.startsWith(current));
}

type Done = (completions: string[]) => void;

/** yargs' completion hook (the four-argument form: ours first, yargs' defaults otherwise). */
export function complete(current: string, _argv: unknown, defaults: (cb?: (err: Error | null, c: string[] | undefined) => void) => unknown, done: Done): void {
  const at = process.argv.indexOf('--get-yargs-completions');
  const kind = completionKind(at >= 0 ? process.argv.slice(at + 1) : []);
  if (!kind) return void defaults();
  const timeout = new Promise<string[]>((r) => setTimeout(() => r([]), 1500).unref());
  Promise.race([completeNames(kind, current), timeout]).then(done, () => done([]));
}
