// What the controller publishes: commands and config to devices, status and
// fleet events to integrators. Services depend on this, not on the broker.
import type { Logger } from 'pino';
import { topics, type Broker } from '../../broker/index.js';
import type { Command, ConfigureCommand, DeviceConfigMessage, DeviceStatusMessage, FleetEvent } from '../../schemas/index.js';

export interface FleetPublisher {
  command(deviceId: string, command: Command): Promise<void>;
  /**
   * A configure command, QoS 0: it reaches a connected device at once and is
   * never queued in an offline session, where it would be delivered after a
   * newer one. The retained config message is what carries a configuration
   * reliably (the latest one only) to a device that comes back.
   */
  configure(deviceId: string, command: ConfigureCommand): Promise<void>;
  /**
   * One command to many devices: serialised once, published to every
   * device's topic without waiting device by device. Resolves when every
   * publish has been handled, with the devices it could not be published to.
   */
  commandMany(deviceIds: string[], command: Command): Promise<Array<{ deviceId: string; error: Error }>>;
  config(deviceId: string, config: DeviceConfigMessage): Promise<void>;
  status(message: DeviceStatusMessage): Promise<void>;
  event(event: FleetEvent): Promise<void>;
}

/** Command publishes in flight at once during a fan-out. */
const FANOUT_WINDOW = 128;

export function createFleetPublisher(broker: Broker, logger: Logger): FleetPublisher {
  // Status and events are informational: a failure is logged, never fatal.
  const bestEffort = (p: Promise<void>, what: string) =>
    p.catch((err: Error) => logger.warn({ err: err.message }, `could not publish ${what}`));
  return {
    command: (deviceId, command) => broker.publish(topics.commands(deviceId), command, { qos: 1 }),
    configure: (deviceId, command) => broker.publish(topics.commands(deviceId), command, { qos: 0 }),
    async commandMany(deviceIds, command) {
      const payload = Buffer.from(JSON.stringify(command));
      const failed: Array<{ deviceId: string; error: Error }> = [];
      // A window of publishes in flight, not all at once: Aedes takes each
      // publish through several asynchronous steps, and 10,000 started
      // together advance step by step in lockstep, so the first device got
      // its command only when the last one did. With a window the first
      // commands are on the wire at once and devices work while the rest go out.
      let next = 0;
      const lane = async () => {
        while (next < deviceIds.length) {
          const deviceId = deviceIds[next++]!;
          await broker.publish(topics.commands(deviceId), payload, { qos: 1 }).catch((error: Error) => void failed.push({ deviceId, error }));
        }
      };
      await Promise.all(Array.from({ length: Math.min(FANOUT_WINDOW, deviceIds.length) }, lane));
      return failed;
    },
    config: (deviceId, config) => broker.publish(topics.config(deviceId), config, { qos: 1, retain: true }),
    status: (message) =>
      bestEffort(broker.publish(topics.status(message.device_id), message, { qos: 1, retain: true }), 'status'),
    event: (event) => bestEffort(broker.publish(topics.deploymentEvents(event.deployment_id), event, { qos: 1 }), 'event'),
  };
}
