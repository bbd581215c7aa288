// Where the broker keeps sessions, subscriptions, retained and queued QoS 1
// messages: in memory for one process; Redis when several share the load.
//
// With Redis, two things are shared: the persistence (aedes-persistence-redis:
// sessions, subscriptions, retained messages, QoS 1 messages waiting for an
// offline client) and the emitter (mqemitter-redis: a message published on any
// broker reaches the clients connected to every other). Together they make any
// number of controller processes one broker.
import { Redis } from 'ioredis';
import aedesPersistenceRedis, { type AedesPersistenceRedis } from 'aedes-persistence-redis';
import mqemitterRedis from 'mqemitter-redis';
import type { Logger } from 'pino';

export type PersistenceConfig =
  | { kind: 'memory' }
  | {
      kind: 'redis';
      url: string;
      /** How long start-up waits for Redis before giving up; default 10 s. */
      connectTimeoutMs?: number;
    };

export interface BrokerPersistence {
  readonly kind: PersistenceConfig['kind'];
  /** What Aedes takes as `persistence` (undefined: its in-memory default). */
  persistence: unknown;
  /** What Aedes takes as `mq` (undefined: its in-process emitter). */
  mq: unknown;
  /** Releases the connections; call after the broker has closed. */
  close(): Promise<void>;
}

export class PersistenceUnavailableError extends Error {
  constructor(message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = 'PersistenceUnavailableError';
  }
}

/** A Redis URL fit for a log line or an error message: the password hidden. */
export function redactRedisUrl(url: string): string {
  return url.replace(/^(rediss?:\/\/)[^@/]*@/i, '$1***@');
}

export async function createPersistence(config: PersistenceConfig, logger?: Logger): Promise<BrokerPersistence> {
  if (config.kind === 'memory') {
    return { kind: 'memory', persistence: undefined, mq: undefined, close: async () => {} };
  }
  return createRedisPersistence(config.url, config.connectTimeoutMs ?? 10_000, logger);
}

async function createRedisPersistence(url: string, connectTimeoutMs: number, logger?: Logger): Promise<BrokerPersistence> {
  const where = redactRedisUrl(url);
  // One connection for the persistence, two for the emitter (a subscribed
  // Redis connection can do nothing else). All are ours, so all are closed here.
  let firstError: Error | undefined;
  const connections = ['persistence', 'publish', 'subscribe'].map((role) => {
    const conn = new Redis(url, { lazyConnect: true, connectTimeout: connectTimeoutMs, connectionName: `kernex-${role}` });
    let ready = false;
    let reported = 0;
    conn.on('error', (err: Error) => {
      // Before the first connection the start-up error below says it all.
      if (!ready) {
        firstError ??= err;
        return;
      }
      // ioredis retries by itself; say so without flooding the log while Redis is down.
      if (reported++ % 100 === 0) logger?.warn({ redis: where, role, err: err.message }, 'redis connection error; retrying');
    });
    conn.on('ready', () => {
      if (reported > 0) logger?.info({ redis: where, role }, 'redis connection restored');
      ready = true;
      reported = 0;
    });
    return conn;
  });
  const [db, pubConn, subConn] = connections as [Redis, Redis, Redis];

  try {
    await withTimeout(Promise.all(connections.map((c) => c.connect())), connectTimeoutMs);
  } catch (err) {
    for (const c of connections) c.disconnect();
    throw new PersistenceUnavailableError(
      `cannot connect to Redis at ${where} (${(firstError ?? (err as Error)).message}). ` +
        'Check that Redis is running and that KERNEX_REDIS_URL is right.',
      { cause: err },
    );
  }

  const persistence = oneBroadcastPerSubscribe(aedesPersistenceRedis({ conn: db }));
  // Aedes' own emitter matches empty levels ([MQTT-4.7.1-3]); so must this one.
  const mq = mqemitterRedis({ pubConn, subConn, matchEmptyLevels: true });
  let closed = false;
  return {
    kind: 'redis',
    persistence,
    mq,
    async close() {
      if (closed) return;
      closed = true;
      // By now Aedes has closed the emitter (quitting both of its
      // connections). destroy() unsubscribes the persistence's broadcast
      // topics through that emitter and disconnects the persistence's
      // connection; it must not keep a stopping process waiting.
      await withTimeout(persistence.destroy(), 2_000).catch((err: Error) =>
        logger?.debug({ err: err.message }, 'redis persistence did not close cleanly'),
      );
      // Only those still open: disconnecting an ended connection again arms a
      // 2 s timer in ioredis that nothing clears, delaying the process's exit.
      for (const c of connections) if (c.status !== 'end') c.disconnect();
    },
  };
}

/**
 * Aedes 1.2 calls addSubscriptions(client, packet.subscriptions) once per
 * topic of a SUBSCRIBE, concurrently. The Redis persistence then broadcasts
 * each call and waits for its echo under a key made of the client id and the
 * first topic, so concurrent calls overwrite each other's waiter and all but
 * one never settle: a SUBSCRIBE of two topics (the agent's commands and
 * config) on a persistent session never got its SUBACK. Here the calls of one
 * packet (same array) share one broadcast, and a client's calls run one at a time.
 */
function oneBroadcastPerSubscribe(persistence: AedesPersistenceRedis): AedesPersistenceRedis {
  for (const method of ['addSubscriptions', 'removeSubscriptions'] as const) {
    const original = persistence[method].bind(persistence);
    const inflight = new WeakMap<object, Promise<unknown>>();
    const perClient = new Map<string, Promise<unknown>>();
    persistence[method] = (client: { id: string }, subs: object) => {
      const same = inflight.get(subs);
      if (same) return same;
      const previous = perClient.get(client.id) ?? Promise.resolve();
      const call = previous.catch(() => {}).then(() => original(client, subs));
      inflight.set(subs, call);
      perClient.set(client.id, call);
      void call.catch(() => {}).finally(() => {
        if (perClient.get(client.id) === call) perClient.delete(client.id);
      });
      return call;
    };
  }
  return persistence;
}

function withTimeout<T>(p: Promise<T>, ms: number): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`no answer within ${ms} ms`)), ms);
  });
  return Promise.race([p, timeout]).finally(() => clearTimeout(timer));
}
