// Public face of the agent's bundle handling: download, verify, extract, run.
// Everything here treats the bundle as hostile until proven otherwise.
export {
  downloadBundle, sha256File, DownloadError, BundleVerificationError, type DownloadOptions,
} from './download.js';
export {
  extractBundle, resolveBundlePath, removeStaleExtractions, EntryPolicy, UnsafeBundleError, BundleFormatError,
  DEFAULT_MAX_BYTES, DEFAULT_MAX_ENTRIES, type ExtractLimits, type ExtractHooks, type EntryHeader,
} from './extract.js';
export {
  runScript, killLeftoverGroup, killTaggedGroups, processStartTime, OUTPUT_TAIL_BYTES, type RunScriptOptions, type ScriptResult,
} from './run.js';
export {
  signBundleDigest, signBundleFile, verifyBundleSignature, assertTrustedSigner, parseSignature, loadTrustedKeys,
  generateSigningKey, keyId, BundleSignatureError, SIGNATURE_PATTERN, type TrustedKey,
} from './signature.js';
