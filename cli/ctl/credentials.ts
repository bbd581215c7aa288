// Where kernexctl finds the controller and a token, in order:
//   1. --server / --token flags
//   2. KERNEX_SERVER / KERNEX_TOKEN (and KERNEX_MQTT_URL)
//   3. <data dir>/credentials.json, which a local controller writes on first
//      start (data dir: --data-dir, KERNEX_DATA_DIR, or ./.kernex)
//   4. http://127.0.0.1:8000
// The file's token is only sent to the server the file names: pointing
// kernexctl at another server never leaks the local admin token to it.
import { readFileSync } from 'node:fs';
import { join, resolve } from 'node:path';

export const DEFAULT_SERVER = 'http://127.0.0.1:8000';

export interface CredentialFlags {
  server?: string;
  token?: string;
  mqttUrl?: string;
  dataDir?: string;
}

export interface ResolvedCredentials {
  server: string;
  token: string | undefined;
  /** Where the token came from, to tell the user what to fix when it is refused. */
  tokenSource: string;
  /** Known MQTT URL, if any; otherwise the controller's /health says. */
  mqttUrl: string | undefined;
  credentialsFile: string;
}

interface CredentialsFile {
  server?: string;
  mqtt?: string;
  token?: string;
}

function readCredentialsFile(file: string): CredentialsFile | null {
  let raw: string;
  try {
    raw = readFileSync(file, 'utf8');
  } catch {
    return null;
  }
  try {
    const data: unknown = JSON.parse(raw);
    if (typeof data !== 'object' || data === null) return null;
    const d = data as Record<string, unknown>;
    const str = (v: unknown) => (typeof v === 'string' && v.length > 0 ? v : undefined);
    return { server: str(d.server), mqtt: str(d.mqtt), token: str(d.token) };
  } catch {
    return null;
  }
}

const normalize = (url: string) => url.replace(/\/+$/, '').replace(/\/api\/v1$/, '');

export function resolveCredentials(flags: CredentialFlags, env: NodeJS.ProcessEnv = process.env): ResolvedCredentials {
  const dataDir = resolve(flags.dataDir ?? env.KERNEX_DATA_DIR ?? '.kernex');
  const credentialsFile = join(dataDir, 'credentials.json');
  const file = readCredentialsFile(credentialsFile);

  const explicitServer = flags.server ?? env.KERNEX_SERVER;
  const server = normalize(explicitServer ?? file?.server ?? DEFAULT_SERVER);
  const fileMatches = file?.server !== undefined && normalize(file.server) === server;

  let token: string | undefined;
  let tokenSource: string;
  if (flags.token) {
    token = flags.token;
    tokenSource = '--token';
  } else if (env.KERNEX_TOKEN) {
    token = env.KERNEX_TOKEN;
    tokenSource = 'KERNEX_TOKEN';
  } else if (fileMatches && file?.token) {
    token = file.token;
    tokenSource = credentialsFile;
  } else {
    token = undefined;
    tokenSource = 'none';
  }
  const mqttUrl = flags.mqttUrl ?? env.KERNEX_MQTT_URL ?? (fileMatches ? file?.mqtt : undefined);
  return { server, token, tokenSource, mqttUrl, credentialsFile };
}
