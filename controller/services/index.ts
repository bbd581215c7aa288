// The controller's services, built once and shared by routes and MQTT handlers.
import type { Logger } from 'pino';
import type { Principal, Revocation } from '../../broker/index.js';
import type { Repositories } from '../model.js';
import type { BlobStore } from '../blobs/index.js';
import type { FleetPublisher } from '../mqtt/publisher.js';
import { TokenService } from './tokens.js';
import { DeviceService } from './devices.js';
import { BundleService } from './bundles.js';
import { DeploymentService } from './deployments.js';
import { HistoryService } from './history.js';
import { ConfigService } from './configs.js';
import { RollbackService } from './rollback.js';
import { AccessService } from './access.js';
import type { ProofOptions } from './registration-proof.js';
import { DeploymentSweeper } from './sweeper.js';

export {
  TokenService, DeviceService, BundleService, DeploymentService, HistoryService, ConfigService, RollbackService, AccessService,
  DeploymentSweeper,
};
export type { SweepReport } from './sweeper.js';

export interface Services {
  repos: Repositories;
  tokens: TokenService;
  devices: DeviceService;
  bundles: BundleService;
  deployments: DeploymentService;
  history: HistoryService;
  configs: ConfigService;
  rollbacks: RollbackService;
  access: AccessService;
  /** Deployment timeouts and repairs, in one periodic pass. */
  sweeper: DeploymentSweeper;
  /** A bearer token as an HTTP principal: a device token or an API token. */
  authenticateBearer(token: string): Promise<Principal | null>;
}

export function createServices(deps: {
  repos: Repositories;
  blobs: BlobStore;
  publisher: FleetPublisher;
  logger: Logger;
  heartbeatFlushMs: number;
  maxBundleBytes: number;
  registrationProof?: ProofOptions;
  /** Tells every controller instance about a revocation (caches, connections). */
  announceRevocation?: (revocation: Revocation) => Promise<void>;
  sweepIntervalMs: number;
  /** This controller's stable name among several (presence ownership). */
  instanceId: string;
}): Services {
  const { repos, blobs, publisher, logger } = deps;
  const tokens = new TokenService(repos, logger);
  const devices = new DeviceService(repos, tokens, publisher, logger, {
    flushMs: deps.heartbeatFlushMs, proof: deps.registrationProof, instanceId: deps.instanceId,
  });
  const bundles = new BundleService(repos, blobs, logger, deps.maxBundleBytes);
  const history = new HistoryService(repos, logger);
  const deployments = new DeploymentService(repos, bundles, devices, publisher, logger, history);
  const configs = new ConfigService(repos, publisher, logger, devices);
  const rollbacks = new RollbackService(bundles, devices, history, deployments);
  const access = new AccessService(repos, tokens, devices, logger, deps.announceRevocation ?? (async () => {}));
  const sweeper = new DeploymentSweeper(repos, deployments, logger.child({ component: 'sweeper' }), { intervalMs: deps.sweepIntervalMs });
  return {
    repos, tokens, devices, bundles, deployments, history, configs, rollbacks, access, sweeper,
    async authenticateBearer(token) {
      const deviceId = await devices.byToken(token);
      if (deviceId) return { kind: 'device', deviceId };
      const user = await tokens.role(token);
      return user ? { kind: 'user', role: user.role, tokenId: user.doc._id, name: user.doc.name } : null;
    },
  };
}
