// The exact bytes that are signed, in one place: the controller verifies what
// the agent and kernexctl sign. Each message starts with its own label, so a
// signature made for one purpose can never be replayed for another.

/** What a device signs at registration: proof that it holds the private key of the public key it sends. */
export const registrationMessage = (deviceId: string, timestamp: string): Buffer =>
  Buffer.from(`kernex-register:${deviceId}:${timestamp}`);

/** What a bundle signature covers: the archive's sha256 (so every byte of it, manifest included). */
export const bundleSignatureMessage = (sha256: string): Buffer =>
  Buffer.from(`kernex-bundle:v1:${sha256.toLowerCase()}`);

/** A detached bundle signature: `ed25519:<key id (16 hex)>:<base64 of the 64-byte signature>`. */
export const BUNDLE_SIGNATURE_PATTERN = /^ed25519:[0-9a-f]{16}:[A-Za-z0-9+/]{86}==$/;
