// What an attacker sends: hand-built tar archives (tar.c refuses to make most
// of them), raw MQTT bytes, and MQTT clients that do what they should not.
import { createWriteStream } from 'node:fs';
import { connect as netConnect, type Socket } from 'node:net';
import { Readable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import { createGzip, gzipSync } from 'node:zlib';
import mqtt, { type IClientOptions, type MqttClient } from 'mqtt';
import * as tar from 'tar';

export interface RawEntry {
  path: string;
  type?: 'File' | 'Directory' | 'SymbolicLink' | 'Link' | 'CharacterDevice' | 'BlockDevice' | 'FIFO';
  body?: string | Buffer;
  linkpath?: string;
  mode?: number;
}

function header(e: RawEntry, size: number): Buffer {
  const block = Buffer.alloc(512);
  new tar.Header({
    path: e.path, type: e.type ?? 'File', size, linkpath: e.linkpath,
    mode: e.mode ?? (e.type === 'Directory' ? 0o755 : 0o644), uid: 0, gid: 0, mtime: new Date(0),
  }).encode(block, 0);
  return block;
}

/** A tar stream written header by header: whatever we ask for, hostile or not (no end blocks). */
export function rawTarEntries(entries: RawEntry[]): Buffer {
  const blocks: Buffer[] = [];
  for (const e of entries) {
    const body = typeof e.body === 'string' ? Buffer.from(e.body) : e.body ?? Buffer.alloc(0);
    blocks.push(header(e, body.length));
    if (body.length > 0) blocks.push(body, Buffer.alloc((512 - (body.length % 512)) % 512));
  }
  return Buffer.concat(blocks);
}

export const rawTarGz = (entries: RawEntry[]): Buffer => gzipSync(Buffer.concat([rawTarEntries(entries), Buffer.alloc(1024)]));

/** A valid manifest and deploy script, to which a hostile entry is added. */
export function bundleEntries(version: string): RawEntry[] {
  return [
    { path: 'manifest.json', body: JSON.stringify({ name: 'hostile', version, deploy: { script: 'deploy.sh' } }) },
    { path: 'deploy.sh', body: '#!/bin/sh\necho deployed\n', mode: 0o755 },
  ];
}

/** A gzip bomb: a valid bundle plus one entry of `size` zero bytes; about 1/1000 of that on disk. */
export async function writeGzipBomb(file: string, version: string, size: number): Promise<void> {
  async function* bytes(): AsyncGenerator<Buffer> {
    yield rawTarEntries(bundleEntries(version));
    yield header({ path: 'zeros.bin' }, size);
    const chunk = Buffer.alloc(1024 * 1024);
    for (let left = size; left > 0; left -= chunk.length) yield left >= chunk.length ? chunk : chunk.subarray(0, left);
    yield Buffer.alloc(1024);
  }
  await pipeline(Readable.from(bytes()), createGzip({ level: 6 }), createWriteStream(file));
}

// ------------------------------------------------------------------ MQTT

/** Connects with mqtt.js; never reconnects, so a refusal or a close is final. */
export function mqttConnect(url: string, options: IClientOptions): Promise<MqttClient> {
  return mqtt.connectAsync(url, { reconnectPeriod: 0, connectTimeout: 5000, protocolVersion: 4, ...options });
}

/** Resolves when the client's connection is closed (by the broker or us). */
export function whenClosed(client: MqttClient): Promise<void> {
  return new Promise((resolve) => {
    if (!client.connected && client.disconnected) return resolve();
    client.once('close', () => resolve());
  });
}

/** Subscribes and returns the granted QoS per filter (128 = refused). */
export async function subscribeGranted(client: MqttClient, filters: string[]): Promise<number[]> {
  try {
    const granted = await client.subscribeAsync(filters, { qos: 1 });
    return granted.map((g) => g.qos);
  } catch (err) {
    // mqtt.js rejects when any filter is refused; the SUBACK it carries says which.
    const granted = (err as { packet?: { granted?: Array<number | { qos: number }> } }).packet?.granted;
    if (!granted) throw err;
    return granted.map((g) => (typeof g === 'number' ? g : g.qos));
  }
}

const varint = (n: number): Buffer => {
  const out: number[] = [];
  do {
    let b = n % 128;
    n = Math.floor(n / 128);
    if (n > 0) b |= 0x80;
    out.push(b);
  } while (n > 0);
  return Buffer.from(out);
};
const str = (s: string): Buffer => {
  const b = Buffer.from(s);
  return Buffer.concat([Buffer.from([b.length >> 8, b.length & 0xff]), b]);
};

/** An MQTT 3.1.1 CONNECT packet with username and password, clean session. */
export function connectPacket(clientId: string, username: string, password: string): Buffer {
  const body = Buffer.concat([str('MQTT'), Buffer.from([4, 0xc2, 0, 30]), str(clientId), str(username), str(password)]);
  return Buffer.concat([Buffer.from([0x10]), varint(body.length), body]);
}

/** A SUBSCRIBE packet for one filter at QoS 0. */
export function subscribePacket(packetId: number, filter: string): Buffer {
  const body = Buffer.concat([Buffer.from([packetId >> 8, packetId & 0xff]), str(filter), Buffer.from([0])]);
  return Buffer.concat([Buffer.from([0x82]), varint(body.length), body]);
}

/** The fixed header of a QoS 0 PUBLISH declaring `length` bytes, with the start of its topic. */
export function publishHeader(length: number, topic: string): Buffer {
  return Buffer.concat([Buffer.from([0x30]), varint(length), str(topic)]);
}

/** A raw TCP connection to the broker, recording what comes back and when it closes. */
export interface RawSession {
  socket: Socket;
  received(): Buffer;
  closed: Promise<void>;
  isClosed(): boolean;
}

export function rawSession(port: number): Promise<RawSession> {
  return new Promise((resolve, reject) => {
    const socket = netConnect(port, '127.0.0.1');
    const chunks: Buffer[] = [];
    let isClosed = false;
    const closed = new Promise<void>((r) => socket.once('close', () => {
      isClosed = true;
      r();
    }));
    socket.on('data', (d: Buffer) => chunks.push(d));
    socket.on('error', () => {});
    socket.once('connect', () => resolve({ socket, received: () => Buffer.concat(chunks), closed, isClosed: () => isClosed }));
    socket.once('error', reject);
  });
}

/** Writes as much of `total` bytes as the socket takes before it closes; the count written. */
export async function writeUntilClosed(session: RawSession, total: number): Promise<number> {
  const chunk = Buffer.alloc(64 * 1024, 0x61);
  let written = 0;
  while (written < total && !session.isClosed() && !session.socket.destroyed) {
    const ok = session.socket.write(chunk);
    written += chunk.length;
    if (!ok) {
      await Promise.race([new Promise((r) => session.socket.once('drain', r)), session.closed]);
    }
  }
  return written;
}
