// The device's key pair: created once, kept in the data dir (0600), and used
// to prove at registration that the device holds the private key.
import { generateKeyPairSync, createPrivateKey, createPublicKey, sign, type KeyObject } from 'node:crypto';
import { readFile, writeFile } from 'node:fs/promises';
import { join } from 'node:path';
import { registrationMessage } from '../schemas/index.js';

export interface Identity {
  publicKeyPem: string;
  privateKey: KeyObject;
}

export async function loadIdentity(dataDir: string): Promise<Identity> {
  const file = join(dataDir, 'device-key.pem');
  try {
    const privateKey = createPrivateKey(await readFile(file, 'utf8'));
    return { privateKey, publicKeyPem: createPublicKey(privateKey).export({ type: 'spki', format: 'pem' }).toString() };
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
  }
  const { privateKey, publicKey } = generateKeyPairSync('ed25519');
  await writeFile(file, privateKey.export({ type: 'pkcs8', format: 'pem' }), { mode: 0o600, flag: 'wx' });
  return { privateKey, publicKeyPem: publicKey.export({ type: 'spki', format: 'pem' }).toString() };
}

/** The registration proof: a signature over the device id and a fresh timestamp. */
export function registrationProof(identity: Identity, deviceId: string): { timestamp: string; signature: string } {
  const timestamp = new Date().toISOString();
  const signature = sign(null, registrationMessage(deviceId, timestamp), identity.privateKey).toString('base64');
  return { timestamp, signature };
}
