// Aedes' in-memory persistence with retained messages indexed by topic.
//
// The stock implementation answers every SUBSCRIBE by testing the filter
// against every retained message. Kernex retains a status and a config
// message per device, so with N devices each subscription cost O(N) and
// connecting a fleet cost O(N²): at 2,000 devices most of the broker's CPU
// went there. Devices subscribe to exact topics, which are now one map
// lookup; wildcard filters (integrators) still scan, as before.
import { Readable } from 'node:stream';
import memoryPersistence from 'aedes-persistence';

interface RetainedPacket {
  topic: string;
  payload: Buffer;
  [key: string]: unknown;
}

type Callback = (err: Error | null) => void;

interface CallbackPersistence {
  storeRetained(packet: RetainedPacket, cb?: Callback): Promise<void> | void;
  createRetainedStream(pattern: string): Readable;
  createRetainedStreamCombi(patterns: string[]): Readable;
}

/** True when `topic` matches the MQTT filter `filter` (`+` one level, `#` the rest). */
export function topicMatches(filter: string, topic: string): boolean {
  // Wildcards never match topics starting with `$` at the first level (MQTT 4.7.2).
  if (topic.startsWith('$') && (filter.startsWith('+') || filter.startsWith('#'))) return false;
  const f = filter.split('/');
  const t = topic.split('/');
  for (let i = 0; i < f.length; i++) {
    if (f[i] === '#') return true;
    if (i >= t.length) return false;
    if (f[i] !== '+' && f[i] !== t[i]) return false;
  }
  return f.length === t.length;
}

const hasWildcard = (filter: string) => filter.includes('+') || filter.includes('#');

function* matching(retained: Map<string, RetainedPacket>, patterns: string[]): Generator<RetainedPacket> {
  for (const pattern of patterns) {
    if (!hasWildcard(pattern)) {
      const packet = retained.get(pattern);
      if (packet) yield packet;
      continue;
    }
    for (const [topic, packet] of retained) if (topicMatches(pattern, topic)) yield packet;
  }
}

export function createMemoryPersistence(): unknown {
  const persistence = (memoryPersistence as unknown as () => CallbackPersistence)();
  const retained = new Map<string, RetainedPacket>();
  persistence.storeRetained = (packet, cb) => {
    // As the stock implementation: a copy, and an empty payload clears the topic.
    if (packet.payload.length === 0) retained.delete(packet.topic);
    else retained.set(packet.topic, { ...packet });
    if (cb) {
      process.nextTick(cb, null);
      return;
    }
    return Promise.resolve();
  };
  persistence.createRetainedStream = (pattern) => Readable.from(matching(retained, [pattern]));
  persistence.createRetainedStreamCombi = (patterns) => Readable.from(matching(retained, patterns));
  return persistence;
}
