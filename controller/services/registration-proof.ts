// Proof of possession at registration: the device signs its id and a fresh
// timestamp with the private key of the public key it registers. Someone who
// copied a device's public key (it is no secret) cannot register as it, and a
// captured request cannot be replayed: the timestamp must be recent and newer
// than the last proof accepted for that device.
import { createPublicKey, verify, type KeyObject } from 'node:crypto';
import { registrationMessage } from '../../schemas/index.js';
import { ApiError, badRequest } from '../errors.js';

export type ProofPolicy = 'required' | 'optional';

export interface ProofOptions {
  policy: ProofPolicy;
  /** How far the device's clock may be from ours, either way. */
  maxSkewSeconds: number;
}

const SIGNING_TYPES = new Set(['ed25519', 'ed448', 'ec', 'rsa']);

/** Parses a registration public key; throws 400 for anything that is not one. */
export function parsePublicKey(pem: string): { key: KeyObject; normalized: string } {
  let key: KeyObject;
  try {
    key = createPublicKey(pem);
  } catch {
    throw badRequest('public_key is not a PEM public key (SPKI, "-----BEGIN PUBLIC KEY-----")', 'invalid_public_key');
  }
  if (!SIGNING_TYPES.has(key.asymmetricKeyType ?? '')) {
    throw badRequest(`public_key type ${key.asymmetricKeyType} cannot sign; use Ed25519`, 'invalid_public_key');
  }
  if (key.asymmetricKeyType === 'rsa' && (key.asymmetricKeyDetails?.modulusLength ?? 0) < 2048) {
    throw badRequest('RSA public keys must have at least 2048 bits', 'invalid_public_key');
  }
  return { key, normalized: key.export({ type: 'spki', format: 'pem' }).toString() };
}

const refused = (message: string, code = 'invalid_proof') => new ApiError(401, code, message);

/**
 * Checks the registration proof. Returns the proof's timestamp (to be stored,
 * so it cannot be used again), or null when the policy is 'optional' and the
 * request carries none. `lastProofAt` is the newest proof accepted before for
 * this device id, if any.
 */
export function verifyRegistrationProof(
  req: { device_id: string; signature?: string; timestamp?: string },
  key: KeyObject,
  lastProofAt: string | null,
  options: ProofOptions,
  nowMs = Date.now(),
): string | null {
  if (req.signature === undefined && req.timestamp === undefined && options.policy === 'optional') return null;
  if (!req.signature || !req.timestamp) {
    throw refused('registration must prove possession of the private key: send "timestamp" (ISO 8601, now) and ' +
      '"signature" (base64 of the signature over "kernex-register:<device_id>:<timestamp>")', 'proof_required');
  }
  const at = Date.parse(req.timestamp);
  if (!Number.isFinite(at)) throw refused(`timestamp '${req.timestamp}' is not a date`);
  const skew = Math.abs(nowMs - at) / 1000;
  if (skew > options.maxSkewSeconds) {
    throw refused(`timestamp ${req.timestamp} is ${Math.round(skew)} s away from the controller's clock ` +
      `(at most ${options.maxSkewSeconds} s allowed); check the device's clock`, 'stale_proof');
  }
  if (lastProofAt && at <= Date.parse(lastProofAt)) {
    throw refused('this registration proof is not newer than one already used for this device; sign a fresh timestamp',
      'stale_proof');
  }
  const signature = Buffer.from(req.signature, 'base64');
  const algorithm = key.asymmetricKeyType === 'ed25519' || key.asymmetricKeyType === 'ed448' ? null : 'sha256';
  let ok = false;
  try {
    ok = signature.length > 0 && verify(algorithm, registrationMessage(req.device_id, req.timestamp), key, signature);
  } catch {
    ok = false;
  }
  if (!ok) throw refused('the signature does not match the public key: the request was not signed by this device\'s private key');
  return new Date(at).toISOString();
}
