// The embedded MQTT broker: Aedes with Kernex's authentication, ACL and
// listeners. It knows nothing about the store; the controller supplies hooks.
import { Aedes, type AuthenticateError, type Client } from 'aedes';
import { createServer, type AddressInfo, type Server } from 'node:net';
import type { Logger } from 'pino';
import { canPublish, canSubscribe, type Principal } from './acl.js';
import { parseDeviceTopic } from './topics.js';
import { createPersistence, type PersistenceConfig } from './persistence.js';

export { canPublish, canSubscribe, type Principal, type Role } from './acl.js';
export { topics, parseDeviceTopic, PREFIX } from './topics.js';
export type { PersistenceConfig } from './persistence.js';

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
}

export interface BrokerOptions {
  id?: string;
  persistence?: PersistenceConfig;
  /** Seconds a socket may stay open without sending CONNECT. */
  connectTimeoutMs?: number;
}

export interface Broker {
  readonly aedes: Aedes;
  listenTcp(port: number, host?: string): Promise<AddressInfo>;
  /** Publishes as the controller itself (no client, so no ACL applies). */
  publish(topic: string, payload: unknown, options?: { qos?: 0 | 1; retain?: boolean }): Promise<void>;
  /** Closes every connection of a device (revocation). */
  disconnectDevice(deviceId: string): void;
  isDeviceConnected(deviceId: string): boolean;
  close(): Promise<void>;
}

// Messages that fail their schema are rerouted here: a `$` topic that no
// wildcard matches (MQTT 4.7.2) and nobody may subscribe to, so the message
// is neither stored nor forwarded while the device stays connected.
const DROPPED_TOPIC = '$kernex/dropped';

function authError(message: string, returnCode: number): AuthenticateError {
  return Object.assign(new Error(message), { returnCode }) as AuthenticateError;
}

export async function createBroker(options: BrokerOptions, hooks: BrokerHooks, logger: Logger): Promise<Broker> {
  const principals = new WeakMap<Client, Principal>();
  const deviceClients = new Map<string, Client>();
  const persistence = await createPersistence(options.persistence ?? { kind: 'memory' });
  const servers: Server[] = [];

  const aedes = await Aedes.createBroker({
    id: options.id,
    persistence: persistence.persistence,
    mq: persistence.mq,
    connectTimeout: options.connectTimeoutMs ?? 10_000,
    maxClientsIdLength: 128,

    authenticate(client, username, password, done) {
      hooks.authenticate(client.id, username, password).then(
        (principal) => {
          if (!principal) return done(authError('bad username or password', 4), null);
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
  });

  aedes.on('clientReady', (client) => {
    const principal = principals.get(client);
    if (!principal) return;
    if (principal.kind === 'device') deviceClients.set(principal.deviceId, client);
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
    }
    hooks.clientGone?.(principal, client.id);
  });
  aedes.on('subscribe', (subs, client) => {
    const principal = client && principals.get(client);
    if (!principal) return;
    for (const s of subs) hooks.subscribed?.(principal, s.topic);
  });
  aedes.on('clientError', (client, err) => {
    logger.debug({ clientId: client?.id, err: err.message }, 'mqtt client error');
  });
  aedes.on('connectionError', (client, err) => {
    logger.debug({ clientId: client?.id, err: err.message }, 'mqtt connection error');
  });

  return {
    aedes,
    listenTcp(port, host) {
      const server = createServer(aedes.handle);
      servers.push(server);
      return new Promise((resolve, reject) => {
        server.once('error', reject);
        server.listen(port, host, () => resolve(server.address() as AddressInfo));
      });
    },
    publish(topic, payload, opts = {}) {
      return new Promise((resolve, reject) => {
        aedes.publish(
          {
            cmd: 'publish',
            topic,
            payload: Buffer.from(JSON.stringify(payload)),
            qos: opts.qos ?? 1,
            retain: opts.retain ?? false,
            dup: false,
          },
          (err) => (err ? reject(err) : resolve()),
        );
      });
    },
    disconnectDevice(deviceId) {
      deviceClients.get(deviceId)?.close();
    },
    isDeviceConnected(deviceId) {
      return deviceClients.has(deviceId);
    },
    async close() {
      await Promise.all(servers.map((s) => new Promise<void>((r) => s.close(() => r()))));
      await new Promise<void>((resolve) => aedes.close(() => resolve()));
      await persistence.close();
    },
  };
}
