// The embedded MQTT broker: Aedes with Kernex's authentication, ACL and
// listeners. It knows nothing about the store; the controller supplies hooks.
import { Aedes, type AuthenticateError, type Client } from 'aedes';
import type { IncomingMessage, Server as HttpServer } from 'node:http';
import { createServer, type AddressInfo, type Server, type Socket } from 'node:net';
import type { Duplex } from 'node:stream';
import { createServer as createTlsServer, type Server as TlsServer, type TlsOptions } from 'node:tls';
import type { Logger } from 'pino';
import { WebSocketServer, createWebSocketStream } from 'ws';
import { canPublish, canSubscribe, type Principal } from './acl.js';
import { PREFIX, parseDeviceTopic, topics } from './topics.js';
import { createPersistence, type PersistenceConfig } from './persistence.js';
import { ConnectionGate, GuardedConnection, type ConnectionStats } from './connections.js';
import { createMemoryPersistence } from './memory-persistence.js';

export { canPublish, canSubscribe, type Principal, type Role } from './acl.js';
export { topics, parseDeviceTopic, PREFIX } from './topics.js';
export { PersistenceUnavailableError, redactRedisUrl, type PersistenceConfig } from './persistence.js';
export { FrameScanner, PacketTooLargeError, type ConnectionStats } from './connections.js';

/** A credential was revoked: every broker instance drops what it cached and closes what it holds. */
export type Revocation = { kind: 'device'; id: string } | { kind: 'token'; id: string };

export interface BrokerHooks {
  /** Resolves a CONNECT's credentials to a principal, or null to refuse. */
  authenticate(clientId: string, username: string | undefined, password: Buffer | undefined): Promise<Principal | null>;
  /**
   * A device's own heartbeat or results message, after the ACL allowed it.
   * Resolve 'drop' to swallow it (invalid payload); reject when it could not
   * be processed, so it is not acknowledged and the device sends it again.
   */
  deviceMessage(deviceId: string, channel: 'heartbeat' | 'results', payload: Buffer): Promise<'accept' | 'drop'>;
  clientReady?(principal: Principal, clientId: string): void;
  clientGone?(principal: Principal, clientId: string): void;
  subscribed?(principal: Principal, topic: string): void;
  /** A revocation announced by any instance (this one included). */
  revoked?(revocation: Revocation): void;
}

export interface BrokerLimits {
  /** Largest MQTT packet accepted (remaining length); a bigger one closes the connection. */
  maxPacketBytes: number;
  /** Connections open at once, over every listener. */
  maxConnections: number;
  /** Connections that have not sent CONNECT yet; beyond this the oldest is closed. */
  maxPendingConnections: number;
  /** Milliseconds a connection may stay open without sending CONNECT. */
  connectTimeoutMs: number;
  /** Milliseconds a subscriber may leave its socket full before it is dropped. */
  drainTimeoutMs: number;
  /** Bytes that may wait to be sent to a client that does not read; beyond, it is dropped. */
  maxOutboundBytes: number;
}

export const DEFAULT_BROKER_LIMITS: BrokerLimits = {
  maxPacketBytes: 256 * 1024,
  maxConnections: 20_000,
  maxPendingConnections: 1_000,
  connectTimeoutMs: 10_000,
  drainTimeoutMs: 30_000,
  maxOutboundBytes: 8 * 1024 * 1024,
};

export interface BrokerOptions {
  id?: string;
  persistence?: PersistenceConfig;
  limits?: Partial<BrokerLimits>;
  /**
   * How often this broker tells the others on its Redis that it is alive
   * (Aedes' heartbeat); one silent for 3 intervals counts as gone. Default 60 s.
   */
  heartbeatIntervalMs?: number;
}

export interface Broker {
  readonly aedes: Aedes;
  readonly limits: BrokerLimits;
  /** This broker's id among the brokers sharing one Redis (unique per process start). */
  readonly id: string;
  /** Ids of the brokers (this one included) heard from within the last 3 heartbeat intervals. */
  peers(): string[];
  listenTcp(port: number, host?: string): Promise<AddressInfo>;
  /** MQTT over TLS (8883 by convention). */
  listenTls(port: number, host: string | undefined, tls: TlsOptions): Promise<AddressInfo>;
  /** Certificate and key for new TLS connections (rotation); open ones keep theirs. Throws if they do not fit together. */
  setTlsContext(tls: TlsOptions): void;
  /** MQTT over WebSocket on an existing HTTP(S) server, at `path` (e.g. /mqtt). */
  attachWebSocket(server: HttpServer, path: string): void;
  /**
   * Publishes as the controller itself (no client, so no ACL applies). The
   * payload is serialised as JSON unless it is a Buffer already (one
   * command fanned out to many devices is serialised once).
   */
  publish(topic: string, payload: unknown, options?: { qos?: 0 | 1; retain?: boolean }): Promise<void>;
  /** Closes this instance's connection of a device (revocation). */
  disconnectDevice(deviceId: string): void;
  /** Tells every instance (through the broker's emitter) that a credential was revoked. */
  announceRevocation(revocation: Revocation): Promise<void>;
  isDeviceConnected(deviceId: string): boolean;
  connectionStats(): ConnectionStats;
  close(): Promise<void>;
}

// Messages that fail their schema are rerouted here: a `$` topic that no
// wildcard matches (MQTT 4.7.2) and nobody may subscribe to, so the message
// is neither stored nor forwarded while the device stays connected.
const DROPPED_TOPIC = '$kernex/dropped';
// Revocations travel between instances on this topic; no client may use `$` topics.
const REVOCATION_TOPIC = '$kernex/control/revoked';

/** The part of mqemitter (Aedes' message bus, Redis-backed across instances) used here. */
interface Emitter {
  on(topic: string, listener: (packet: { payload: Buffer | string }, cb: () => void) => void): void;
}

/** Pending connections the kernel queues for the MQTT listener. */
const LISTEN_BACKLOG = 8192;

/** Whether a filter matches some device's commands topic (`kernex/devices/{id}/commands`). */
function isCommandsFilter(filter: string): boolean {
  const want = [PREFIX, 'devices', undefined, 'commands'];
  const parts = filter.split('/');
  for (let i = 0; i < parts.length; i++) {
    const part = parts[i]!;
    if (part === '#') return true;
    if (i >= want.length) return false;
    if (part !== '+' && want[i] !== undefined && part !== want[i]) return false;
  }
  return parts.length === want.length;
}

function authError(message: string, returnCode: number): AuthenticateError {
  return Object.assign(new Error(message), { returnCode }) as AuthenticateError;
}

export async function createBroker(options: BrokerOptions, hooks: BrokerHooks, logger: Logger): Promise<Broker> {
  const principals = new WeakMap<Client, Principal>();
  const wills = new WeakMap<Client, { topic: string; retain: boolean }>();
  const deviceClients = new Map<string, Client>();
  /** Open connections per API token, so revoking a token closes them. */
  const tokenClients = new Map<string, Set<Client>>();
  const persistence = await createPersistence(options.persistence ?? { kind: 'memory' }, logger);
  const limits: BrokerLimits = { ...DEFAULT_BROKER_LIMITS, ...options.limits };
  const gate = new ConnectionGate(limits);
  const servers: Array<Server | WebSocketServer> = [];
  const tlsServers: TlsServer[] = [];
  const heartbeatMs = options.heartbeatIntervalMs ?? 60_000;
  /** Device connections subscribed to their own commands topic. */
  const commandSubscribers = new WeakSet<Client>();
  /**
   * Commands-topic filters held by other sessions (operators diagnosing), by
   * client id: persistent sessions keep theirs while disconnected. An entry
   * left stale only turns the direct delivery below off, never on.
   */
  const commandReaders = new Map<string, Set<string>>();

  const aedes = await Aedes.createBroker({
    id: options.id,
    // In memory: Aedes' own persistence, with retained messages indexed by topic.
    persistence: persistence.persistence ?? createMemoryPersistence(),
    mq: persistence.mq,
    heartbeatInterval: heartbeatMs,
    connectTimeout: limits.connectTimeoutMs,
    drainTimeout: limits.drainTimeoutMs,
    maxClientsIdLength: 128,

    preConnect(client, packet, done) {
      // CONNECT arrived: the connection is no longer an idle one that may be evicted.
      gate.authenticated(client.conn as Duplex);
      if (packet.will) wills.set(client, { topic: packet.will.topic, retain: packet.will.retain ?? false });
      done(null, true);
    },

    authenticate(client, username, password, done) {
      hooks.authenticate(client.id, username, password).then(
        (principal) => {
          if (!principal) return done(authError('bad username or password', 4), null);
          // A will is published on the client's behalf later: it must be one the client could publish now.
          const will = wills.get(client);
          if (will && !canPublish(principal, will.topic, will.retain)) {
            logger.warn({ clientId: client.id, topic: will.topic, retain: will.retain }, 'connection refused: will not allowed');
            return done(authError(`not allowed to set a will on ${will.topic}`, 5), null);
          }
          principals.set(client, principal);
          done(null, true);
        },
        (err: Error) => {
          logger.error({ err, clientId: client.id }, 'authentication failed unexpectedly');
          done(authError('server unavailable', 3), null);
        },
      );
    },

    authorizePublish(client, packet, done) {
      const principal = client ? principals.get(client) : undefined;
      if (!client || !principal || !canPublish(principal, packet.topic, packet.retain)) {
        return done(new Error(`not allowed to publish to ${packet.topic}`));
      }
      const parsed = parseDeviceTopic(packet.topic)!;
      hooks.deviceMessage(parsed.deviceId, parsed.channel as 'heartbeat' | 'results', packet.payload as Buffer).then(
        (verdict) => {
          if (verdict === 'drop') packet.topic = DROPPED_TOPIC;
          done(null);
        },
        (err: Error) => done(err),
      );
    },

    authorizeSubscribe(client, sub, done) {
      const principal = principals.get(client);
      if (!principal || !canSubscribe(principal, sub.topic)) {
        logger.debug({ clientId: client.id, topic: sub.topic }, 'subscription refused');
        return done(null, null);
      }
      done(null, sub);
    },
  }).catch(async (err: unknown) => {
    // Release the persistence's connections when the broker cannot start.
    await persistence.close();
    throw err;
  });

  aedes.on('clientReady', (client) => {
    const principal = principals.get(client);
    if (!principal) return;
    if (principal.kind === 'device') deviceClients.set(principal.deviceId, client);
    else {
      const set = tokenClients.get(principal.tokenId) ?? new Set<Client>();
      tokenClients.set(principal.tokenId, set.add(client));
    }
    hooks.clientReady?.(principal, client.id);
  });
  aedes.on('clientDisconnect', (client) => {
    const principal = principals.get(client);
    if (!principal) return;
    // A device that reconnected took over its session: the old client's
    // disconnect arrives after the new one is ready and must not mark it gone.
    if (principal.kind === 'device') {
      if (deviceClients.get(principal.deviceId) !== client) return;
      deviceClients.delete(principal.deviceId);
    } else {
      const set = tokenClients.get(principal.tokenId);
      set?.delete(client);
      if (set?.size === 0) tokenClients.delete(principal.tokenId);
      // A clean session's subscriptions end with it; a persistent one's stay.
      if (client.clean) commandReaders.delete(client.id);
    }
    hooks.clientGone?.(principal, client.id);
  });
  aedes.on('subscribe', (subs, client) => {
    const principal = client && principals.get(client);
    if (!principal) return;
    for (const s of subs) {
      if (principal.kind === 'device') {
        if (s.topic === topics.commands(principal.deviceId)) commandSubscribers.add(client);
      } else if (isCommandsFilter(s.topic)) {
        commandReaders.set(client.id, (commandReaders.get(client.id) ?? new Set()).add(s.topic));
      }
      hooks.subscribed?.(principal, s.topic);
    }
  });
  aedes.on('unsubscribe', (unsubs, client) => {
    const principal = client && principals.get(client);
    if (!principal) return;
    for (const topic of unsubs) {
      if (principal.kind === 'device') {
        if (topic === topics.commands(principal.deviceId)) commandSubscribers.delete(client);
      } else {
        const held = commandReaders.get(client.id);
        held?.delete(topic);
        if (held?.size === 0) commandReaders.delete(client.id);
      }
    }
  });
  aedes.on('clientError', (client, err) => {
    logger.debug({ clientId: client?.id, err: err.message }, 'mqtt client error');
  });
  aedes.on('connectionError', (client, err) => {
    logger.debug({ clientId: client?.id, err: err.message }, 'mqtt connection error');
  });

  // Revocations from any instance: local caches and connections go at once.
  const emitter = (aedes as unknown as { mq: Emitter }).mq;
  emitter.on(REVOCATION_TOPIC, (packet, cb) => {
    try {
      const revocation = JSON.parse(packet.payload.toString()) as Revocation;
      // Caches first, so a reconnect right after the close is checked against the store.
      hooks.revoked?.(revocation);
      if (revocation.kind === 'device') deviceClients.get(revocation.id)?.close();
      else for (const client of tokenClients.get(revocation.id) ?? []) client.close();
    } catch (err) {
      logger.error({ err }, 'could not apply a revocation');
    }
    cb();
  });

  /**
   * The one client that can receive this topic, when that is known here: a
   * device's commands topic, the device connected to this instance and
   * subscribed to it, and no other session holding a filter on commands.
   * Such a publish goes to the client directly (Aedes queues it in the
   * device's session as it would otherwise), skipping the topic matching
   * against every subscription twice and the message bus: in a fan-out to
   * 10,000 devices that was a fifth of the controller's time per command.
   * With Redis, subscribers on other instances are not known here, so every
   * publish takes the broker's own path.
   */
  const onlyReader = (topic: string): Client | undefined => {
    if (persistence.kind !== 'memory' || commandReaders.size > 0) return undefined;
    const parsed = parseDeviceTopic(topic);
    if (parsed?.channel !== 'commands') return undefined;
    const client = deviceClients.get(parsed.deviceId);
    return client && commandSubscribers.has(client) ? client : undefined;
  };

  /** Every connection, whatever its transport, enters Aedes through here. */
  const accept = (raw: Duplex, req?: IncomingMessage) => {
    const conn = new GuardedConnection(raw, limits, (err) => {
      gate.stats.oversized++;
      logger.warn({ declared: err.declared, limit: err.limit }, 'mqtt connection closed: packet too large');
    }, (err) => {
      gate.stats.slow++;
      logger.warn({ buffered: err.buffered, limit: limits.maxOutboundBytes }, 'mqtt client dropped: it stopped reading');
    });
    conn.on('error', () => {}); // Aedes reports connection errors itself.
    // The gate tracks what Aedes sees as the client's connection (preConnect marks it).
    if (!gate.admit(conn)) {
      logger.warn({ limit: limits.maxConnections }, 'mqtt connection refused: too many connections');
      conn.destroy();
      return;
    }
    aedes.handle(conn, req);
  };
  const listen = (server: Server, port: number, host?: string) => {
    servers.push(server);
    return new Promise<AddressInfo>((resolve, reject) => {
      server.once('error', reject);
      // A fleet reconnecting at once (controller restart, network blip) is
      // thousands of SYNs in the same instant: with Node's default backlog
      // of 511 the rest are dropped and retried by TCP after 1, 3, 7, 15,
      // 31 s. The kernel caps this at net.core.somaxconn.
      server.listen({ port, host, backlog: LISTEN_BACKLOG }, () => resolve(server.address() as AddressInfo));
    });
  };

  return {
    aedes,
    limits,
    id: aedes.id,
    peers() {
      const since = Date.now() - 3 * heartbeatMs;
      const heard = Object.entries(aedes.brokers as Record<string, number>).filter(([, at]) => at >= since).map(([id]) => id);
      return [...new Set([aedes.id, ...heard])];
    },
    listenTcp(port, host) {
      return listen(createServer((socket: Socket) => accept(socket)), port, host);
    },
    listenTls(port, host, tls) {
      const server = createTlsServer(tls, (socket) => accept(socket));
      tlsServers.push(server);
      // A client that fails the handshake (wrong CA, plain TCP) never reaches Aedes.
      server.on('tlsClientError', (err) => logger.debug({ err: err.message }, 'mqtt tls handshake failed'));
      return listen(server, port, host);
    },
    setTlsContext(tls) {
      for (const server of tlsServers) server.setSecureContext(tls);
    },
    attachWebSocket(server, path) {
      // maxPayload bounds what ws buffers for one frame, as the scanner bounds MQTT packets.
      const wss = new WebSocketServer({ noServer: true, maxPayload: limits.maxPacketBytes + 16 });
      servers.push(wss);
      server.on('upgrade', (req: IncomingMessage, socket: Duplex, head: Buffer) => {
        if (new URL(req.url ?? '/', 'http://x').pathname !== path) return socket.destroy();
        if (!gate.hasRoom()) {
          gate.stats.refused++;
          return socket.destroy();
        }
        wss.handleUpgrade(req, socket, head, (ws) => {
          const stream = createWebSocketStream(ws);
          stream.on('error', () => {});
          accept(stream, req);
        });
      });
    },
    publish(topic, payload, opts = {}) {
      return new Promise((resolve, reject) => {
        const packet = {
          cmd: 'publish' as const,
          topic,
          payload: Buffer.isBuffer(payload) ? payload : Buffer.from(JSON.stringify(payload)),
          qos: opts.qos ?? 1,
          retain: opts.retain ?? false,
          dup: false,
        };
        const done = (err?: Error | null) => (err ? reject(err) : resolve());
        const reader = packet.retain ? undefined : onlyReader(topic);
        if (reader) reader.publish(packet, done);
        else aedes.publish(packet, done);
      });
    },
    disconnectDevice(deviceId) {
      deviceClients.get(deviceId)?.close();
    },
    announceRevocation(revocation) {
      return new Promise((resolve, reject) => {
        aedes.publish(
          { cmd: 'publish', topic: REVOCATION_TOPIC, payload: Buffer.from(JSON.stringify(revocation)), qos: 0, retain: false, dup: false },
          (err) => (err ? reject(err) : resolve()),
        );
      });
    },
    isDeviceConnected(deviceId) {
      return deviceClients.has(deviceId);
    },
    connectionStats() {
      return gate.snapshot();
    },
    async close() {
      // Stop accepting first, then close the clients, then wait for the listeners.
      const closed = servers.map((s) => new Promise<void>((r) => s.close(() => r())));
      await new Promise<void>((resolve) => aedes.close(() => resolve()));
      await Promise.all(closed);
      await persistence.close();
    },
  };
}
