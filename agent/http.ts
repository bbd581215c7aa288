// The earlier system's REST path, used while MQTT is unreachable: a heartbeat
// whose answer carries the pending commands, and results reported with POST.
// Commands it returns go to the same executor as MQTT commands, so a command
// that arrives both ways still runs once.
import type { Logger } from 'pino';
import { validate, type Command, type CommandResult, type Heartbeat, type ResultRequest } from '../schemas/index.js';

export class HttpStatusError extends Error {
  constructor(readonly status: number, message: string) {
    super(message);
    this.name = 'HttpStatusError';
  }
}

export interface HttpFallbackOptions {
  server: string;
  deviceId: string;
  token: () => string;
  logger: Logger;
  /** HTTP client (carries a configured CA); the global fetch by default. */
  fetchImpl?: typeof fetch;
}

export class HttpFallback {
  constructor(private opts: HttpFallbackOptions) {}

  private async post(path: string, body: unknown, timeoutMs: number): Promise<Response> {
    return (this.opts.fetchImpl ?? fetch)(`${this.opts.server}/api/v1${path}`, {
      method: 'POST',
      headers: { 'content-type': 'application/json', authorization: `Bearer ${this.opts.token()}` },
      body: JSON.stringify(body),
      signal: AbortSignal.timeout(timeoutMs),
    });
  }

  /** Sends a heartbeat; resolves with the valid commands of the answer (an invalid one is logged and skipped). */
  async heartbeat(hb: Heartbeat, timeoutMs: number): Promise<Command[]> {
    const res = await this.post(`/devices/${encodeURIComponent(this.opts.deviceId)}/heartbeat`, hb, timeoutMs);
    const data: unknown = await res.json().catch(() => null);
    if (!res.ok) throw new HttpStatusError(res.status, `heartbeat refused (HTTP ${res.status}): ${messageOf(data)}`);
    const list = data !== null && typeof data === 'object' ? (data as { commands?: unknown }).commands : undefined;
    if (!Array.isArray(list)) throw new HttpStatusError(res.status, 'the heartbeat answer has no commands array');
    const commands: Command[] = [];
    for (const raw of list) {
      if (validate.command(raw)) commands.push(raw);
      else this.opts.logger.warn({ reasons: validate.command.explain() }, 'invalid command in the heartbeat answer ignored');
    }
    return commands;
  }

  /**
   * Reports an outcome with POST /deployments/{id}/result. Progress is not
   * sent (that endpoint takes outcomes only). A refusal that no retry can
   * change (403 not a target, 404 unknown deployment, 400) counts as
   * delivered; other failures reject, so the outcome stays unreported and is
   * sent again later.
   */
  async report(result: CommandResult, timeoutMs: number): Promise<void> {
    if (result.status === 'in_progress') return;
    const body: ResultRequest = {
      device_id: this.opts.deviceId, status: result.status, error_message: result.error_message ?? null,
      exit_code: result.exit_code ?? null, duration_seconds: result.duration_seconds ?? null,
      ...(result.output_tail !== undefined ? { output_tail: result.output_tail } : {}),
      ...(result.bundle_version !== undefined ? { bundle_version: result.bundle_version } : {}),
    };
    const res = await this.post(`/deployments/${encodeURIComponent(result.deployment_id)}/result`, body, timeoutMs);
    const data: unknown = await res.json().catch(() => null);
    if (res.ok) return;
    if (res.status === 400 || res.status === 403 || res.status === 404) {
      this.opts.logger.warn({ deploymentId: result.deployment_id, status: res.status, reason: messageOf(data) },
        'the controller refused the result; not sending it again');
      return;
    }
    throw new HttpStatusError(res.status, `result not accepted (HTTP ${res.status}): ${messageOf(data)}`);
  }
}

function messageOf(data: unknown): string {
  const message = data !== null && typeof data === 'object' ? (data as { message?: unknown }).message : undefined;
  return typeof message === 'string' ? message : 'no reason given';
}
