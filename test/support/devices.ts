// Device identities as the agent makes them: an Ed25519 key pair, and the
// registration proof (a signature over the device id and a fresh timestamp).
import { generateKeyPairSync, sign, type KeyObject } from 'node:crypto';
import { registrationMessage } from '../../schemas/index.js';
import type { ApiClient } from './controller.js';

export interface DeviceKey {
  publicKeyPem: string;
  privateKey: KeyObject;
}

export function deviceKey(): DeviceKey {
  const { publicKey, privateKey } = generateKeyPairSync('ed25519');
  return { publicKeyPem: publicKey.export({ type: 'spki', format: 'pem' }).toString(), privateKey };
}

/** The proof fields of a registration request, signed with `key` (timestamp now unless given). */
export function proof(key: DeviceKey, deviceId: string, timestamp = new Date().toISOString()) {
  return { timestamp, signature: sign(null, registrationMessage(deviceId, timestamp), key.privateKey).toString('base64') };
}

/** Registers a device over REST as the agent does; the answer plus the key used. */
export async function registerDevice(api: ApiClient, deviceId: string, enrollmentToken: string, key: DeviceKey = deviceKey()) {
  const res = await api.withToken(undefined).post('/devices/register', {
    device_id: deviceId, public_key: key.publicKeyPem, enrollment_token: enrollmentToken, ...proof(key, deviceId),
  });
  return { ...res, key };
}
