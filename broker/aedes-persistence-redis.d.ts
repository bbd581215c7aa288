// aedes-persistence-redis ships no types: the part of its API Kernex uses.
declare module 'aedes-persistence-redis' {
  import type { Redis } from 'ioredis';

  export interface AedesPersistenceRedisOptions {
    /** An existing connection to use (and to disconnect on destroy). */
    conn?: Redis;
    /** Most offline messages delivered on CONNECT (default 1000). */
    maxSessionDelivery?: number;
  }

  export interface AedesPersistenceRedis {
    setup(broker: unknown): Promise<void>;
    /** `subs`: for add, the subscriptions ({topic, qos}); for remove, the topics. */
    addSubscriptions(client: { id: string }, subs: object): Promise<unknown>;
    removeSubscriptions(client: { id: string }, subs: object): Promise<unknown>;
    destroy(): Promise<void>;
  }

  export default function aedesPersistenceRedis(options?: AedesPersistenceRedisOptions): AedesPersistenceRedis;
}
