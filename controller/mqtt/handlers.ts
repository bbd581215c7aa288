// Where device messages arriving over MQTT are handled: authentication,
// heartbeats, results and presence, wired into the broker's hooks.
import type { Logger } from 'pino';
import { topics, type BrokerHooks, type Principal } from '../../broker/index.js';
import { parseJson, validate, SchemaError } from '../../schemas/index.js';
import type { DeviceService } from '../services/devices.js';
import type { DeploymentService } from '../services/deployments.js';
import type { TokenService } from '../services/tokens.js';
import type { AccessService } from '../services/access.js';

export interface MessageCounters {
  /** Invalid payloads (schema), never stored. */
  dropped: number;
  /** Valid results that changed nothing: unknown deployment, or contradicting a recorded final outcome. */
  ignored: number;
  /** Results that could not be recorded (store unavailable): not acknowledged, so the device sends them again. */
  failed: number;
  /** Device results this instance processed (with several controllers: only those of devices connected to it). */
  results: number;
}

/** The broker hooks, and a way to wait for the device messages being processed (graceful stop). */
export interface ControllerBrokerHooks extends BrokerHooks {
  drain(): Promise<void>;
}

export function createBrokerHooks(deps: {
  devices: DeviceService;
  deployments: DeploymentService;
  tokens: TokenService;
  access: AccessService;
  logger: Logger;
  counters: MessageCounters;
  /** How long after connecting a device may take to subscribe before its pending commands are re-sent anyway. */
  resubscribeGraceMs?: number;
}): ControllerBrokerHooks {
  const { devices, deployments, tokens, access, logger, counters } = deps;
  const resubscribeGraceMs = deps.resubscribeGraceMs ?? 500;
  const inFlight = new Set<Promise<unknown>>();
  const track = <T>(work: Promise<T>): Promise<T> => {
    inFlight.add(work);
    const forget = () => inFlight.delete(work);
    work.then(forget, forget);
    return work;
  };

  const drop = (deviceId: string, channel: string, err: SchemaError) => {
    counters.dropped++;
    // Logged sparingly: a device flooding bad messages must not flood the log.
    if (counters.dropped <= 10 || counters.dropped % 1000 === 0) {
      logger.warn({ deviceId, channel, dropped: counters.dropped, reason: err.message }, 'invalid message dropped');
    }
    return 'drop' as const;
  };

  const resend = (deviceId: string) =>
    void deployments.resendPending(deviceId).catch((err: Error) =>
      logger.warn({ deviceId, err: err.message }, 'could not re-send pending commands'),
    );
  // A device that subscribes to its commands on connecting (the agent always
  // does) gets what is pending then; one that relies on the session the broker
  // kept gets it once this grace has passed without a subscribe. Re-sending on
  // both sent every pending command twice per connect, and in a reconnect storm
  // doubled the store queries.
  const awaitingSubscribe = new Map<string, NodeJS.Timeout>();
  const cancelAwaiting = (deviceId: string) => {
    clearTimeout(awaitingSubscribe.get(deviceId));
    awaitingSubscribe.delete(deviceId);
  };

  return {
    async authenticate(clientId, username, password): Promise<Principal | null> {
      if (!password || password.length === 0 || password.length > 512) return null;
      const secret = password.toString('utf8');
      if (username && (await devices.authenticate(username, secret))) {
        // The client id is bound to the credential, so no one can take over a device's session.
        return clientId === username ? { kind: 'device', deviceId: username } : null;
      }
      const user = await tokens.role(secret);
      if (!user) return null;
      if (await devices.exists(clientId)) return null;
      return { kind: 'user', role: user.role, tokenId: user.doc._id, name: user.doc.name };
    },

    async deviceMessage(deviceId, channel, payload) {
      if (channel === 'heartbeat') {
        try {
          devices.heartbeat(deviceId, parseJson(validate.heartbeat, payload, 'heartbeat'), 'mqtt');
        } catch (err) {
          if (err instanceof SchemaError) return drop(deviceId, channel, err);
          throw err;
        }
        return 'accept';
      }
      let result;
      try {
        result = parseJson(validate.result, payload, 'result');
      } catch (err) {
        if (err instanceof SchemaError) return drop(deviceId, channel, err);
        throw err;
      }
      // Awaited before the PUBACK: a result that could not be recorded is not acknowledged.
      let outcome;
      try {
        outcome = await track(deployments.recordResult(deviceId, result));
      } catch (err) {
        counters.failed++;
        logger.warn({ deviceId, deploymentId: result.deployment_id, err: (err as Error).message },
          'result not recorded and not acknowledged; the device sends it again');
        throw err;
      }
      if (outcome === 'unknown' || outcome === 'ignored') counters.ignored++;
      counters.results++;
      return 'accept';
    },

    async drain() {
      for (const deviceId of [...awaitingSubscribe.keys()]) cancelAwaiting(deviceId);
      while (inFlight.size) await Promise.allSettled([...inFlight]);
    },

    clientReady(principal) {
      if (principal.kind !== 'device') return;
      const { deviceId } = principal;
      void devices.connected(deviceId);
      // A device whose session the broker kept (always, with Redis) may not
      // subscribe again, so `subscribed` below would never re-send; its
      // subscriptions are restored by now, so what is pending can go out.
      cancelAwaiting(deviceId);
      const timer = setTimeout(() => {
        awaitingSubscribe.delete(deviceId);
        resend(deviceId);
      }, resubscribeGraceMs);
      timer.unref();
      awaitingSubscribe.set(deviceId, timer);
    },

    clientGone(principal) {
      if (principal.kind !== 'device') return;
      cancelAwaiting(principal.deviceId);
      devices.disconnected(principal.deviceId);
    },

    revoked(revocation) {
      access.applyRevocation(revocation);
    },

    subscribed(principal, topic) {
      if (principal.kind !== 'device' || topic !== topics.commands(principal.deviceId)) return;
      cancelAwaiting(principal.deviceId);
      resend(principal.deviceId);
    },
  };
}
