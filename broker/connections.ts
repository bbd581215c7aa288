// What stands between a raw connection and Aedes: a cap on MQTT packet size
// (Aedes has none: its parser buffers whatever length a header declares), a
// cap on connections, and a bounded pool of connections that have not
// authenticated yet, so idle sockets cannot crowd out real devices.
import { Duplex } from 'node:stream';

/** Counters an operator (or a test) reads to see the limits at work. */
export interface ConnectionStats {
  /** Connections open now, authenticated or not. */
  open: number;
  /** Connections open now that have not completed CONNECT. */
  pending: number;
  /** Refused at once because `maxConnections` were open. */
  refused: number;
  /** Closed while still unauthenticated, to make room for a newer connection. */
  evicted: number;
  /** Closed because a packet declared more than `maxPacketBytes`. */
  oversized: number;
  /** Closed because they stopped reading and `maxOutboundBytes` piled up for them. */
  slow: number;
}

export class PacketTooLargeError extends Error {
  readonly code = 'packet_too_large';
  constructor(readonly declared: number, readonly limit: number) {
    super(`MQTT packet declares ${declared} bytes, more than the limit of ${limit}`);
    this.name = 'PacketTooLargeError';
  }
}

const enum Scan { Header, Length, Body }

/**
 * Follows the MQTT framing of an inbound byte stream (fixed header byte,
 * remaining length as a 1-4 byte varint, body) without buffering anything,
 * and reports a packet whose declared length is over the limit as soon as
 * its length bytes arrive: before a single byte of its body is held.
 */
export class FrameScanner {
  private state = Scan.Header;
  private length = 0;
  private multiplier = 1;
  private lengthBytes = 0;
  private remaining = 0;

  constructor(private readonly maxPacketBytes: number) {}

  /** Returns the declared length of an oversized packet in `chunk`, or -1. */
  scan(chunk: Buffer): number {
    let i = 0;
    while (i < chunk.length) {
      if (this.state === Scan.Header) {
        i++;
        this.state = Scan.Length;
        this.length = 0;
        this.multiplier = 1;
        this.lengthBytes = 0;
      } else if (this.state === Scan.Length) {
        const b = chunk[i++]!;
        this.length += (b & 0x7f) * this.multiplier;
        this.multiplier *= 128;
        this.lengthBytes++;
        if (this.length > this.maxPacketBytes) return this.length;
        if ((b & 0x80) === 0) {
          this.remaining = this.length;
          this.state = this.remaining > 0 ? Scan.Body : Scan.Header;
        } else if (this.lengthBytes === 4) {
          // A fifth length byte is malformed MQTT; Aedes' parser refuses it too.
          return this.length;
        }
      } else {
        const take = Math.min(this.remaining, chunk.length - i);
        i += take;
        this.remaining -= take;
        if (this.remaining === 0) this.state = Scan.Header;
      }
    }
    return -1;
  }
}

/**
 * Wraps a connection (TCP, TLS or WebSocket stream) for Aedes: bytes pass
 * through unchanged, with backpressure both ways, and the connection is
 * destroyed with PacketTooLargeError when a packet declares too much.
 */
export class SlowConsumerError extends Error {
  readonly code = 'slow_consumer';
  constructor(readonly buffered: number) {
    super(`client stopped reading: ${buffered} bytes waiting to be sent`);
    this.name = 'SlowConsumerError';
  }
}

export interface GuardLimits {
  maxPacketBytes: number;
  /** Bytes that may wait in the socket for a client that does not read; beyond, it is dropped. */
  maxOutboundBytes: number;
}

export class GuardedConnection extends Duplex {
  private readonly scanner: FrameScanner;

  constructor(
    readonly inner: Duplex,
    private readonly limits: GuardLimits,
    onOversize: (err: PacketTooLargeError) => void,
    private readonly onSlow: (err: SlowConsumerError) => void,
  ) {
    super({ allowHalfOpen: false });
    const maxPacketBytes = limits.maxPacketBytes;
    this.scanner = new FrameScanner(maxPacketBytes);
    inner.on('data', (chunk: Buffer) => {
      const declared = this.scanner.scan(chunk);
      if (declared >= 0) {
        const err = new PacketTooLargeError(declared, maxPacketBytes);
        onOversize(err);
        this.destroy(err);
        return;
      }
      if (!this.push(chunk)) inner.pause();
    });
    inner.once('end', () => this.push(null));
    inner.once('error', (err) => this.destroy(err));
    inner.once('close', () => this.destroy());
    inner.pause();
  }

  override _read(): void {
    this.inner.resume();
  }

  /**
   * Writes never hold Aedes up: a message for a client that stopped reading
   * would otherwise keep every other subscriber of it waiting. What cannot be
   * sent yet waits in the socket, up to `maxOutboundBytes`; past that the
   * client is dropped (it reconnects and its persistent session resumes).
   */
  override _write(chunk: Buffer, encoding: BufferEncoding, callback: (error?: Error | null) => void): void {
    this.inner.write(chunk, encoding);
    const buffered = this.inner.writableLength;
    if (buffered > this.limits.maxOutboundBytes) {
      const err = new SlowConsumerError(buffered);
      this.onSlow(err);
      this.destroy(err);
    }
    callback();
  }

  override _final(callback: (error?: Error | null) => void): void {
    this.inner.end();
    callback();
  }

  override _destroy(err: Error | null, callback: (error?: Error | null) => void): void {
    this.inner.destroy();
    callback(err);
  }
}

export interface GateOptions {
  maxConnections: number;
  maxPendingConnections: number;
}

/**
 * Admits connections up to `maxConnections`. Connections that have not
 * authenticated are kept in arrival order; when more than
 * `maxPendingConnections` wait, the oldest is closed. A device's CONNECT
 * follows its TCP handshake within milliseconds, so a flood of idle sockets
 * evicts itself, while the connect timeout ends stragglers.
 */
export class ConnectionGate {
  private readonly pending = new Set<Duplex>();
  private open = 0;
  readonly stats = { refused: 0, evicted: 0, oversized: 0, slow: 0 };

  constructor(private readonly options: GateOptions) {}

  /** False when the connection must be refused (the caller closes it). */
  admit(conn: Duplex): boolean {
    if (this.open >= this.options.maxConnections) {
      this.stats.refused++;
      return false;
    }
    this.open++;
    this.pending.add(conn);
    conn.once('close', () => {
      this.open--;
      this.pending.delete(conn);
    });
    while (this.pending.size > this.options.maxPendingConnections) {
      const oldest = this.pending.values().next().value as Duplex;
      this.pending.delete(oldest);
      this.stats.evicted++;
      oldest.destroy();
    }
    return true;
  }

  /** Whether another connection would be admitted right now. */
  hasRoom(): boolean {
    return this.open < this.options.maxConnections;
  }

  /** The connection completed CONNECT: it no longer counts as pending. */
  authenticated(conn: Duplex): void {
    this.pending.delete(conn);
  }

  snapshot(): ConnectionStats {
    return { open: this.open, pending: this.pending.size, ...this.stats };
  }
}
