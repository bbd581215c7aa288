// Who may publish and subscribe to what. Pure functions over topic strings so
// the rules can be read and tested without a broker.
import { PREFIX, parseDeviceTopic } from './topics.js';

export type Role = 'admin' | 'operator' | 'viewer' | 'integrator';

export type Principal =
  | { kind: 'device'; deviceId: string }
  | { kind: 'user'; role: Role; tokenId: string; name: string };

/**
 * Devices publish only their own heartbeat and results. Nobody but the
 * controller itself (which publishes without a client) publishes commands,
 * config, status or events.
 */
export function canPublish(principal: Principal, topic: string, retain: boolean): boolean {
  if (topic.startsWith('$')) return false;
  if (principal.kind !== 'device') return false;
  if (retain) return false;
  const parsed = parseDeviceTopic(topic);
  return (
    parsed !== null &&
    parsed.deviceId === principal.deviceId &&
    (parsed.channel === 'heartbeat' || parsed.channel === 'results')
  );
}

// Filters a read-only principal may subscribe to; `+` stands for any device id.
const fleetReadable = new Set(['status', 'heartbeat', 'results']);

/**
 * Devices subscribe only to their own commands and config (exact topics, no
 * wildcards). Users may read the fleet's status, heartbeat and results topics
 * (one device or `+`) and events; admins and operators may also read config
 * and commands, for diagnosis.
 */
export function canSubscribe(principal: Principal, filter: string): boolean {
  if (filter.startsWith('$')) return false;
  if (principal.kind === 'device') {
    const parsed = parseDeviceTopic(filter);
    return (
      parsed !== null &&
      parsed.deviceId === principal.deviceId &&
      (parsed.channel === 'commands' || parsed.channel === 'config')
    );
  }
  const parts = filter.split('/');
  if (parts[0] !== PREFIX) return false;
  if (parts[1] === 'events') {
    // kernex/events/# or any filter beneath it.
    return parts.length >= 3 && parts.slice(2).every((p, i, all) => p !== '#' || i === all.length - 1);
  }
  if (parts[1] === 'devices' && parts.length === 4) {
    const [, , device, channel] = parts as [string, string, string, string];
    if (device === '#' || channel === '#' || channel === '+') return false;
    if (device.includes('#') || (device.includes('+') && device !== '+')) return false;
    if (fleetReadable.has(channel)) return true;
    return (principal.role === 'admin' || principal.role === 'operator') &&
      (channel === 'config' || channel === 'commands');
  }
  return false;
}
