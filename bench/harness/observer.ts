// An integrator's MQTT client: subscribes to fleet topics to watch what the
// broker delivers (heartbeats, device status).
import { randomUUID } from 'node:crypto';
import mqtt, { type MqttClient } from 'mqtt';
import type { BrokerTarget } from '../../sim/index.js';

export async function observe(target: BrokerTarget, filter: string | string[], token: string | undefined,
  onMessage: (topic: string, payload: Buffer) => void): Promise<MqttClient> {
  const client = await mqtt.connectAsync({
    host: target.host, port: target.port, clientId: `bench-observer-${randomUUID()}`, username: 'bench', password: token,
    clean: true, reconnectPeriod: 0, protocolVersion: 4,
  });
  client.on('message', onMessage);
  const filters = Array.isArray(filter) ? filter : [filter];
  const granted = await client.subscribeAsync(filters, { qos: filters[0]!.endsWith('/status') ? 1 : 0 });
  const refused = granted.filter((g) => g.qos === 128);
  if (refused.length) throw new Error(`subscription to ${refused.map((g) => g.topic).join(', ')} refused`);
  return client;
}
