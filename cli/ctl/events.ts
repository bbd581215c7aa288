// Live fleet events from the controller's MQTT broker. kernexctl connects as
// an operator: any username, the API token as password, a client id of its
// own (never a device id). Every payload is checked against its schema; one
// that fails is counted and skipped.
import { randomBytes } from 'node:crypto';
import type { IClientOptions, MqttClient } from 'mqtt';
import type {
  CommandResult, DeviceConfigMessage, DeviceStatusMessage, FleetEvent, Heartbeat,
} from '../../schemas/index.js';
import type { Context } from './context.js';
import { CtlError, EXIT } from './errors.js';

export const EVENT_TOPICS = {
  deployments: 'kernex/events/deployments/+',
  device: (deviceId: string, channel: 'status' | 'heartbeat' | 'results' | 'config') => `kernex/devices/${deviceId}/${channel}`,
};

interface Base {
  /** When kernexctl received it. */
  received_at: string;
  topic: string;
  /** Delivered from the broker's retained store on subscribe: a snapshot, not news. */
  retained: boolean;
}

export type LiveEvent =
  | (Base & { channel: 'heartbeat'; device_id: string; data: Heartbeat })
  | (Base & { channel: 'status'; device_id: string; data: DeviceStatusMessage })
  | (Base & { channel: 'results'; device_id: string; data: CommandResult })
  | (Base & { channel: 'config'; device_id: string; data: DeviceConfigMessage })
  | (Base & { channel: 'deployment'; device_id: string | null; data: FleetEvent });

export interface EventStream {
  readonly url: string;
  onEvent(listener: (event: LiveEvent) => void): void;
  /** After the connection came back: the caller reconciles what it may have missed. */
  onReconnect(listener: () => void): void;
  /** Messages that failed their schema. */
  readonly invalid: number;
  close(): Promise<void>;
}

const CONNECT_TIMEOUT_MS = 5_000;

export interface OpenOptions {
  /** Filters that must be granted. */
  filters: string[];
  /** Filters this token may be refused (e.g. config for a viewer); refused ones are skipped. */
  optional?: string[];
}

export async function openEventStream(ctx: Context, opts: OpenOptions): Promise<EventStream> {
  // Loading the client and the validators overlaps the question of where the broker is.
  const [{ default: mqtt }, { validate, parseJson }, url] = await Promise.all([
    import('mqtt'),
    import('../../schemas/index.js'),
    ctx.mqttUrl(),
  ]);
  const token = ctx.creds.token;
  if (!token) {
    throw new CtlError('no API token for the MQTT event stream: pass --token or set KERNEX_TOKEN', EXIT.auth);
  }
  const options: IClientOptions = {
    clientId: `kernexctl-${randomBytes(6).toString('hex')}`,
    username: 'kernexctl',
    password: token,
    clean: true,
    protocolVersion: 4,
    keepalive: 30,
    reconnectPeriod: 1000,
    connectTimeout: CONNECT_TIMEOUT_MS,
    resubscribe: true,
  };
  ctx.out.verbose(`connecting to ${url} as ${options.clientId}`);
  let client: MqttClient;
  try {
    client = await Promise.race([
      mqtt.connectAsync(url, options, false),
      new Promise<never>((_, reject) =>
        setTimeout(() => reject(Object.assign(new Error('connect timed out'), { code: 'ETIMEDOUT' })), CONNECT_TIMEOUT_MS).unref(),
      ),
    ]);
  } catch (err) {
    const code = (err as { code?: number | string }).code;
    if (code === 4 || code === 5 || code === 134 || code === 135) {
      throw new CtlError(`the MQTT broker at ${url} refused the token from ${ctx.creds.tokenSource}; pass a valid one with --token`,
        EXIT.auth, { cause: err });
    }
    throw new CtlError(
      `cannot reach the MQTT broker at ${url} (${String(code ?? (err as Error).message)}): set --mqtt-url or KERNEX_MQTT_URL`,
      EXIT.unreachable, { cause: err },
    );
  }

  const listeners: Array<(e: LiveEvent) => void> = [];
  const reconnectListeners: Array<() => void> = [];
  let invalid = 0;
  let everConnected = true;

  client.on('message', (topic, payload, packet) => {
    const base = { received_at: new Date().toISOString(), topic, retained: Boolean(packet.retain) };
    const parts = topic.split('/');
    let event: LiveEvent;
    try {
      if (parts[1] === 'events' && parts[2] === 'deployments') {
        const data = parseJson(validate.fleetEvent, payload, 'fleet event');
        event = { ...base, channel: 'deployment', device_id: data.device_id ?? null, data };
      } else if (parts[1] === 'devices' && parts.length === 4) {
        const device_id = parts[2]!;
        switch (parts[3]) {
          case 'heartbeat':
            event = { ...base, channel: 'heartbeat', device_id, data: parseJson(validate.heartbeat, payload, 'heartbeat') };
            break;
          case 'status':
            event = { ...base, channel: 'status', device_id, data: parseJson(validate.deviceStatus, payload, 'status') };
            break;
          case 'results':
            event = { ...base, channel: 'results', device_id, data: parseJson(validate.result, payload, 'result') };
            break;
          case 'config':
            event = { ...base, channel: 'config', device_id, data: parseJson(validate.deviceConfig, payload, 'config') };
            break;
          default:
            return;
        }
      } else {
        return;
      }
    } catch (err) {
      invalid++;
      ctx.out.verbose(`skipped a message on ${topic}: ${(err as Error).message}`);
      return;
    }
    for (const l of listeners) l(event);
  });
  client.on('close', () => {
    if (everConnected) ctx.out.verbose(`MQTT connection to ${url} closed; reconnecting`);
  });
  client.on('connect', () => {
    ctx.out.verbose(`MQTT reconnected to ${url}`);
    for (const l of reconnectListeners) l();
  });
  client.on('error', (err) => ctx.out.verbose(`MQTT: ${err.message}`));

  const stream: EventStream = {
    url,
    onEvent: (l) => listeners.push(l),
    onReconnect: (l) => reconnectListeners.push(l),
    get invalid() {
      return invalid;
    },
    close: async () => {
      everConnected = false;
      await client.endAsync(true).catch(() => {});
    },
  };
  ctx.onClose(() => stream.close());

  const subscribe = async (filters: string[], required: boolean) => {
    if (!filters.length) return;
    const granted = await client.subscribeAsync(filters, { qos: 1 });
    for (const g of granted) {
      if (g.qos !== 128) continue;
      if (required) {
        throw new CtlError(`the broker refused the subscription to ${g.topic}: this token's role may not read it`, EXIT.auth);
      }
      ctx.out.verbose(`subscription to ${g.topic} refused for this token; skipped`);
    }
  };
  await subscribe(opts.filters, true);
  await subscribe(opts.optional ?? [], false);
  ctx.out.verbose(`subscribed to ${[...opts.filters, ...(opts.optional ?? [])].join(', ')}`);
  return stream;
}
