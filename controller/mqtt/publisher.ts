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
  config(deviceId: string, config: DeviceConfigMessage): Promise<void>;
  status(message: DeviceStatusMessage): Promise<void>;
  event(event: FleetEvent): Promise<void>;
}

export function createFleetPublisher(broker: Broker, logger: Logger): FleetPublisher {
  // Status and events are informational: a failure is logged, never fatal.
  const bestEffort = (p: Promise<void>, what: string) =>
    p.catch((err: Error) => logger.warn({ err: err.message }, `could not publish ${what}`));
  return {
    command: (deviceId, command) => broker.publish(topics.commands(deviceId), command, { qos: 1 }),
    configure: (deviceId, command) => broker.publish(topics.commands(deviceId), command, { qos: 0 }),
    config: (deviceId, config) => broker.publish(topics.config(deviceId), config, { qos: 1, retain: true }),
    status: (message) =>
      bestEffort(broker.publish(topics.status(message.device_id), message, { qos: 1, retain: true }), 'status'),
    event: (event) => bestEffort(broker.publish(topics.deploymentEvents(event.deployment_id), event, { qos: 1 }), 'event'),
  };
}
