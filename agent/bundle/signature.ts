// Bundle signatures: Ed25519 over the archive's sha256, detached from the
// archive. The publisher signs with a private key kept off the controller;
// an agent configured with trusted public keys refuses a bundle that is
// unsigned, signed by a key it does not trust, or whose signature does not
// match, before a byte of it is extracted. A compromised controller can then
// still stop deployments, but it can no longer make devices run its code.
//
// Format (one line, fits the command's `signature` field):
//   ed25519:<key id>:<base64 signature>
// where the key id is the first 16 hex digits of the sha256 of the public
// key (SPKI DER), and the signature covers `kernex-bundle:v1:<sha256 hex>`.
import { createHash, createPrivateKey, createPublicKey, generateKeyPairSync, sign, verify, type KeyObject } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import { bundleSignatureMessage, BUNDLE_SIGNATURE_PATTERN } from '../../schemas/index.js';
import { sha256File } from './download.js';

/** The bundle is not signed by a trusted key; it was not extracted. */
export class BundleSignatureError extends Error {
  readonly code = 'bundle_signature_invalid';
  constructor(message: string) {
    super(message);
    this.name = 'BundleSignatureError';
  }
}

export const SIGNATURE_PATTERN = BUNDLE_SIGNATURE_PATTERN;

export interface TrustedKey {
  id: string;
  key: KeyObject;
  /** Where the key came from, for messages. */
  source: string;
}

/** A public key's id: the first 16 hex digits of the sha256 of its SPKI DER. */
export function keyId(publicKey: KeyObject): string {
  return createHash('sha256').update(publicKey.export({ type: 'spki', format: 'der' })).digest('hex').slice(0, 16);
}

/** A fresh signing key pair, as PEM (private: PKCS#8, public: SPKI). */
export function generateSigningKey(): { privateKeyPem: string; publicKeyPem: string; keyId: string } {
  const { publicKey, privateKey } = generateKeyPairSync('ed25519');
  return {
    privateKeyPem: privateKey.export({ type: 'pkcs8', format: 'pem' }).toString(),
    publicKeyPem: publicKey.export({ type: 'spki', format: 'pem' }).toString(),
    keyId: keyId(publicKey),
  };
}

function ed25519Private(privateKey: KeyObject | string): KeyObject {
  const key = typeof privateKey === 'string' ? createPrivateKey(privateKey) : privateKey;
  if (key.asymmetricKeyType !== 'ed25519') throw new TypeError(`bundle signing needs an Ed25519 key, got ${key.asymmetricKeyType}`);
  return key;
}

/** Signs an archive's sha256 (hex); returns the signature line. */
export function signBundleDigest(sha256: string, privateKey: KeyObject | string): string {
  if (!/^[0-9a-fA-F]{64}$/.test(sha256)) throw new TypeError('sha256 must be 64 hexadecimal digits');
  const key = ed25519Private(privateKey);
  const signature = sign(null, bundleSignatureMessage(sha256), key).toString('base64');
  return `ed25519:${keyId(createPublicKey(key))}:${signature}`;
}

/** Signs an archive on disk; returns its sha256 and the signature line. */
export async function signBundleFile(archive: string, privateKey: KeyObject | string): Promise<{ sha256: string; signature: string }> {
  const sha256 = await sha256File(archive);
  return { sha256, signature: signBundleDigest(sha256, privateKey) };
}

/** Splits a signature line; throws BundleSignatureError when it is not one. */
export function parseSignature(signature: string): { keyId: string; bytes: Buffer } {
  if (!SIGNATURE_PATTERN.test(signature)) {
    throw new BundleSignatureError('the bundle signature is malformed (expected ed25519:<key id>:<base64>)');
  }
  const [, id, b64] = signature.split(':') as [string, string, string];
  return { keyId: id, bytes: Buffer.from(b64, 'base64') };
}

/**
 * Checks that `signature` is a valid signature of `sha256` by one of
 * `trusted`; returns that key's id. Throws BundleSignatureError otherwise:
 * missing, malformed, unknown key, or not matching.
 */
export function verifyBundleSignature(sha256: string, signature: string | null | undefined, trusted: TrustedKey[]): string {
  if (!signature) throw new BundleSignatureError('the bundle is not signed, and this device only runs bundles signed by a trusted key');
  const parsed = parseSignature(signature);
  const key = trusted.find((k) => k.id === parsed.keyId);
  if (!key) throw new BundleSignatureError(`the bundle is signed by key ${parsed.keyId}, which this device does not trust`);
  if (!verify(null, bundleSignatureMessage(sha256), key.key, parsed.bytes)) {
    throw new BundleSignatureError(`the bundle signature by key ${parsed.keyId} does not match the bundle's sha256`);
  }
  return key.id;
}

/** Checks only what can be checked before download: signed, and by a trusted key. */
export function assertTrustedSigner(signature: string | null | undefined, trusted: TrustedKey[]): void {
  if (!signature) throw new BundleSignatureError('the bundle is not signed, and this device only runs bundles signed by a trusted key');
  const { keyId: id } = parseSignature(signature);
  if (!trusted.some((k) => k.id === id)) throw new BundleSignatureError(`the bundle is signed by key ${id}, which this device does not trust`);
}

const PEM_BLOCK = /-----BEGIN PUBLIC KEY-----[\s\S]+?-----END PUBLIC KEY-----/g;

/**
 * Reads trusted Ed25519 public keys (PEM, several per file allowed) from
 * files, or from every file in a directory. Throws with the path when a
 * source is unreadable or holds no usable key, so a typo cannot quietly turn
 * verification off.
 */
export async function loadTrustedKeys(sources: string[]): Promise<TrustedKey[]> {
  const keys: TrustedKey[] = [];
  for (const source of sources) {
    const st = await fs.stat(source);
    const files = st.isDirectory()
      ? (await fs.readdir(source)).filter((f) => !f.startsWith('.')).sort().map((f) => path.join(source, f))
      : [source];
    let found = 0;
    for (const file of files) {
      const text = await fs.readFile(file, 'utf8');
      for (const pem of text.match(PEM_BLOCK) ?? []) {
        const key = createPublicKey(pem);
        if (key.asymmetricKeyType !== 'ed25519') throw new Error(`${file}: trusted keys must be Ed25519, found ${key.asymmetricKeyType}`);
        keys.push({ id: keyId(key), key, source: file });
        found++;
      }
    }
    if (found === 0) throw new Error(`${source}: no PEM public key (-----BEGIN PUBLIC KEY-----) found`);
  }
  return keys;
}
