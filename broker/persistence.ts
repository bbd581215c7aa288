// Where the broker keeps sessions, subscriptions, retained and queued QoS 1
// messages: in memory for one process; Redis when several share the load.
export type PersistenceConfig = { kind: 'memory' } | { kind: 'redis'; url: string };

export interface BrokerPersistence {
  persistence: unknown;
  mq: unknown;
  close(): Promise<void>;
}

export async function createPersistence(config: PersistenceConfig): Promise<BrokerPersistence> {
  if (config.kind === 'memory') {
    // Aedes' defaults: in-memory persistence and emitter.
    return { persistence: undefined, mq: undefined, close: async () => {} };
  }
  throw new Error(`broker persistence '${config.kind}' is not available yet`);
}
