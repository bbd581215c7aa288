// The fleet simulator: many lightweight devices in one process, each a real
// MQTT connection with its own credentials, behaving like the agent on the
// wire. Used by `kernex simulate`, the demo and the benchmarks.
export { registerDevices, RegistrationError, type DeviceCredentials, type RegisterOptions } from './register.js';
export { Fleet, type FleetOptions, type ConnectReport } from './fleet.js';
export { SimDevice, type BrokerTarget, type CommandMode, type DeviceHooks } from './device.js';
export { PollingFleet, type PollingFleetOptions, type PollerHooks } from './poller.js';
export { BundleWork, fetchAndVerify, VerificationError, type BundleWorkOptions } from './bundle-work.js';
export { Latency, monotonicUs, wallUs, type LatencySummary } from './stats.js';
export { forEachLimit, Semaphore } from './pool.js';
export { sourceAddresses, ephemeralPorts } from './addresses.js';
export { simulate, deviceIds, brokerTarget, type SimulateOptions, type Simulation } from './simulate.js';
