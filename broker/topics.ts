// The MQTT topic contract from DESIGN.md, in one place.
export const PREFIX = 'kernex';

export const topics = {
  heartbeat: (deviceId: string) => `${PREFIX}/devices/${deviceId}/heartbeat`,
  commands: (deviceId: string) => `${PREFIX}/devices/${deviceId}/commands`,
  results: (deviceId: string) => `${PREFIX}/devices/${deviceId}/results`,
  config: (deviceId: string) => `${PREFIX}/devices/${deviceId}/config`,
  status: (deviceId: string) => `${PREFIX}/devices/${deviceId}/status`,
  deploymentEvents: (deploymentId: string) => `${PREFIX}/events/deployments/${deploymentId}`,
};

export type DeviceChannel = 'heartbeat' | 'commands' | 'results' | 'config' | 'status';

/** Splits `kernex/devices/{id}/{channel}`; anything else gives null. */
export function parseDeviceTopic(topic: string): { deviceId: string; channel: DeviceChannel } | null {
  const parts = topic.split('/');
  if (parts.length !== 4 || parts[0] !== PREFIX || parts[1] !== 'devices') return null;
  const channel = parts[3] as DeviceChannel;
  if (!['heartbeat', 'commands', 'results', 'config', 'status'].includes(channel)) return null;
  return { deviceId: parts[2]!, channel };
}
