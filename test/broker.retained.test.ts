// Retained messages in the embedded broker's memory persistence, indexed by
// topic: exact subscriptions are a lookup, wildcards still match as MQTT says.
import type { Readable } from 'node:stream';
import { createMemoryPersistence, topicMatches } from '../broker/memory-persistence.js';

interface Persistence {
  storeRetained(packet: { topic: string; payload: Buffer; retain: boolean; qos: number; cmd: string }): Promise<void>;
  createRetainedStreamCombi(patterns: string[]): Readable;
  createRetainedStream(pattern: string): Readable;
}

const packet = (topic: string, payload: string) => ({ cmd: 'publish', topic, payload: Buffer.from(payload), retain: true, qos: 1 });

async function topicsOf(stream: Readable): Promise<string[]> {
  const out: string[] = [];
  for await (const p of stream) out.push((p as { topic: string }).topic);
  return out.sort();
}

test('exact and wildcard filters find the retained messages they match', async () => {
  const p = createMemoryPersistence() as Persistence;
  await p.storeRetained(packet('kernex/devices/a/status', 'online'));
  await p.storeRetained(packet('kernex/devices/a/config', '{}'));
  await p.storeRetained(packet('kernex/devices/b/status', 'offline'));
  await p.storeRetained(packet('$SYS/x', 'y'));

  expect(await topicsOf(p.createRetainedStreamCombi(['kernex/devices/a/commands', 'kernex/devices/a/config'])))
    .toEqual(['kernex/devices/a/config']);
  expect(await topicsOf(p.createRetainedStream('kernex/devices/+/status'))).toEqual(['kernex/devices/a/status', 'kernex/devices/b/status']);
  expect(await topicsOf(p.createRetainedStream('kernex/#'))).toHaveLength(3);
  expect(await topicsOf(p.createRetainedStream('#'))).toHaveLength(3);

  // An empty retained payload clears the topic; a new one replaces the old.
  await p.storeRetained(packet('kernex/devices/a/status', ''));
  await p.storeRetained(packet('kernex/devices/b/status', 'online'));
  expect(await topicsOf(p.createRetainedStream('kernex/devices/+/status'))).toEqual(['kernex/devices/b/status']);
  const payloads: string[] = [];
  for await (const x of p.createRetainedStream('kernex/devices/b/status')) payloads.push((x as { payload: Buffer }).payload.toString());
  expect(payloads).toEqual(['online']);
});

test('topicMatches follows the MQTT rules', () => {
  expect(topicMatches('a/+/c', 'a/b/c')).toBe(true);
  expect(topicMatches('a/+/c', 'a/b/c/d')).toBe(false);
  expect(topicMatches('a/#', 'a')).toBe(true);
  expect(topicMatches('a/#', 'a/b/c')).toBe(true);
  expect(topicMatches('+/b', '$SYS/b')).toBe(false);
  expect(topicMatches('$SYS/#', '$SYS/b')).toBe(true);
  expect(topicMatches('a/b', 'a/b')).toBe(true);
  expect(topicMatches('a/b', 'a/c')).toBe(false);
});
