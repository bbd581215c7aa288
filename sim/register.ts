// Registers simulated devices through the REST API with the enrollment token,
// exactly as the agent does (Ed25519 key, signed proof), many at a time.
import { generateKeyPairSync, sign } from 'node:crypto';
import { forEachLimit } from './pool.js';

export interface DeviceCredentials {
  device_id: string;
  token: string;
  /** The MQTT URL the controller handed out at registration. */
  mqtt_url: string;
}

export interface RegisterOptions {
  /** Controller base URL, e.g. http://127.0.0.1:8000 */
  server: string;
  enrollmentToken: string;
  ids: readonly string[];
  /** Registrations in flight at once (default 32). */
  concurrency?: number;
  onProgress?: (done: number) => void;
}

export class RegistrationError extends Error {}

const RETRIES = 5;

/** Registers every id; resolves with each device's token, in the order of `ids`. */
export async function registerDevices(opts: RegisterOptions): Promise<DeviceCredentials[]> {
  const out: DeviceCredentials[] = new Array(opts.ids.length);
  let done = 0;
  await forEachLimit(opts.ids, opts.concurrency ?? 32, async (deviceId, i) => {
    out[i] = await registerOne(opts.server, opts.enrollmentToken, deviceId);
    done++;
    if (opts.onProgress && (done % 500 === 0 || done === opts.ids.length)) opts.onProgress(done);
  });
  return out;
}

async function registerOne(server: string, enrollmentToken: string, deviceId: string): Promise<DeviceCredentials> {
  // A key per device, as a real fleet has; the proof is what the agent sends.
  const { privateKey, publicKey } = generateKeyPairSync('ed25519');
  const publicKeyPem = publicKey.export({ type: 'spki', format: 'pem' }).toString();
  for (let attempt = 1; ; attempt++) {
    const timestamp = new Date().toISOString();
    const signature = sign(null, Buffer.from(`kernex-register:${deviceId}:${timestamp}`), privateKey).toString('base64');
    let res: Response;
    try {
      res = await fetch(`${server}/api/v1/devices/register`, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ device_id: deviceId, public_key: publicKeyPem, enrollment_token: enrollmentToken, timestamp, signature }),
      });
    } catch (err) {
      if (attempt >= RETRIES) throw new RegistrationError(`cannot reach ${server} to register ${deviceId}: ${(err as Error).message}`);
      await new Promise((r) => setTimeout(r, 200 * attempt));
      continue;
    }
    const body = (await res.json().catch(() => ({}))) as { token?: string; mqtt_url?: string; message?: string };
    if (res.ok && body.token) return { device_id: deviceId, token: body.token, mqtt_url: body.mqtt_url ?? '' };
    // Overload (429/503) is retried; a refusal is final and says why.
    if ((res.status === 429 || res.status >= 500) && attempt < RETRIES) {
      await new Promise((r) => setTimeout(r, 200 * attempt));
      continue;
    }
    throw new RegistrationError(`registration of ${deviceId} refused (${res.status}): ${body.message ?? 'no reason given'}`);
  }
}
