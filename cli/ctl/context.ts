// What every command gets: its output mode, the resolved credentials, a REST
// client, and the MQTT URL when it needs live events.
import { ApiClient } from './api.js';
import { resolveCredentials, type ResolvedCredentials } from './credentials.js';
import { Output, type Mode } from './output.js';
import type { Health } from './types.js';

export interface GlobalArgs {
  server?: string;
  token?: string;
  mqttUrl?: string;
  dataDir?: string;
  json?: boolean;
  quiet?: boolean;
  verbose?: boolean;
}

export class Context {
  readonly out: Output;
  readonly creds: ResolvedCredentials;
  readonly api: ApiClient;
  private cleanups: Array<() => Promise<void> | void> = [];

  constructor(readonly args: GlobalArgs) {
    const mode: Mode = args.json ? 'json' : args.quiet ? 'quiet' : 'human';
    this.out = new Output(mode, process.stdout, process.stderr, Boolean(args.verbose));
    this.creds = resolveCredentials(args);
    this.out.verbose(`server ${this.creds.server}, token from ${this.creds.tokenSource}`);
    this.api = new ApiClient({
      server: this.creds.server, token: this.creds.token, tokenSource: this.creds.tokenSource,
      credentialsFile: this.creds.credentialsFile, trace: (line) => this.out.verbose(line),
    });
  }

  health(): Promise<Health> {
    return this.api.get<Health>('/health', { auth: false });
  }

  /** The broker's URL: flags/env/credentials file, else what the controller's /health says. */
  async mqttUrl(): Promise<string> {
    if (this.creds.mqttUrl) return this.creds.mqttUrl;
    const health = await this.health();
    if (health.mqtt_url) return health.mqtt_url;
    return `mqtt://${new URL(this.creds.server).hostname}:1883`;
  }

  /** Runs before the process exits (closing MQTT connections and the like). */
  onClose(fn: () => Promise<void> | void): void {
    this.cleanups.push(fn);
  }

  async close(): Promise<void> {
    const fns = this.cleanups.splice(0).reverse();
    for (const fn of fns) {
      try {
        await fn();
      } catch {
        // closing is best effort: the process ends anyway
      }
    }
  }
}
