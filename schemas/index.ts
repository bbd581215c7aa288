// Every payload crossing a socket, a file or a process is checked here first.
// Types come from schemas/types.ts, which is generated from the same files.
import { Ajv2020 } from 'ajv/dist/2020.js';
import type { ErrorObject, ValidateFunction } from 'ajv';
import addFormatsModule from 'ajv-formats';
import semver from 'semver';
import common from './common.schema.json' with { type: 'json' };
import manifest from './manifest.schema.json' with { type: 'json' };
import heartbeat from './heartbeat.schema.json' with { type: 'json' };
import command from './command.schema.json' with { type: 'json' };
import result from './result.schema.json' with { type: 'json' };
import deviceConfig from './device-config.schema.json' with { type: 'json' };
import deviceStatus from './device-status.schema.json' with { type: 'json' };
import fleetEvent from './fleet-event.schema.json' with { type: 'json' };
import registerRequest from './register-request.schema.json' with { type: 'json' };
import deploymentRequest from './deployment-request.schema.json' with { type: 'json' };
import rollbackRequest from './rollback-request.schema.json' with { type: 'json' };
import resultRequest from './result-request.schema.json' with { type: 'json' };
import configUpdate from './config-update.schema.json' with { type: 'json' };
import heartbeatResponse from './heartbeat-response.schema.json' with { type: 'json' };
import bundleHistoryEntry from './bundle-history-entry.schema.json' with { type: 'json' };
import deviceConfigView from './device-config-view.schema.json' with { type: 'json' };
import rollbackResponse from './rollback-response.schema.json' with { type: 'json' };
import apiError from './api-error.schema.json' with { type: 'json' };
import deviceView from './device-view.schema.json' with { type: 'json' };
import bundleView from './bundle-view.schema.json' with { type: 'json' };
import deploymentView from './deployment-view.schema.json' with { type: 'json' };
import registerResponse from './register-response.schema.json' with { type: 'json' };
import resultResponse from './result-response.schema.json' with { type: 'json' };
import tokenRequest from './token-request.schema.json' with { type: 'json' };
import fleetSummary from './fleet-summary.schema.json' with { type: 'json' };
import type {
  BundleManifest, Heartbeat, Command, CommandResult, DeviceConfigMessage, DeviceStatusMessage,
  FleetEvent, RegisterRequest, DeploymentRequest, RollbackRequest, ResultRequest, ConfigUpdate,
  HeartbeatResponse, BundleHistoryEntry, DeviceConfigView, RollbackResponse, ApiErrorBody, DeviceView, BundleView,
  DeploymentView, RegisterResponse, ResultResponse, TokenRequest, FleetSummary,
} from './types.js';

export type * from './types.js';
export { registrationMessage, bundleSignatureMessage, BUNDLE_SIGNATURE_PATTERN } from './messages.js';

/** A payload that does not match its schema; `details` lists every violation. */
export class SchemaError extends Error {
  readonly code = 'invalid_payload';
  constructor(readonly schema: string, readonly details: string[]) {
    super(`invalid ${schema}: ${details.join('; ')}`);
    this.name = 'SchemaError';
  }
}

export interface Validator<T> {
  /** Type guard; never throws. */
  (data: unknown): data is T;
  /** Returns the data typed, or throws SchemaError. */
  parse(data: unknown): T;
  /** The violations of the last failed check. */
  explain(): string[];
  readonly schema: object;
}

// ajv-formats is CommonJS with `exports.default`; under NodeNext the import is the module object.
type AddFormats = (ajv: Ajv2020) => Ajv2020;
const addFormats: AddFormats =
  (addFormatsModule as unknown as { default?: AddFormats }).default ?? (addFormatsModule as unknown as AddFormats);

// Schemas are registered up front and each is compiled on its first use (ajv
// keeps the compiled function): a kernexctl command pays only for the few it
// checks, and a long-running process compiles each one once.
function createAjv(coerceTypes: boolean, registered: object[]): Ajv2020 {
  const ajv = new Ajv2020({ allErrors: true, strict: false, coerceTypes });
  addFormats(ajv);
  ajv.addFormat('semver', { type: 'string', validate: (v: string) => semver.valid(v) !== null });
  ajv.addSchema([common, ...registered]);
  return ajv;
}

const strict = createAjv(false, [
  manifest, heartbeat, command, result, deviceConfig, deviceStatus, fleetEvent, registerRequest, deploymentRequest,
  rollbackRequest, resultRequest, heartbeatResponse, bundleHistoryEntry, deviceConfigView, rollbackResponse, apiError,
  deviceView, bundleView, deploymentView, registerResponse, resultResponse, tokenRequest, fleetSummary,
]);
// Only the config update accepts "120" for 120, as the earlier system sent it.
const coercing = createAjv(true, [configUpdate]);

function describe(errors: ErrorObject[] | null | undefined): string[] {
  return (errors ?? []).map((e) => {
    const where = e.instancePath || '(root)';
    if (e.keyword === 'additionalProperties') {
      return `${where} has unknown field '${String(e.params.additionalProperty)}'`;
    }
    if (e.keyword === 'enum') return `${where} must be one of ${JSON.stringify(e.params.allowedValues)}`;
    return `${where} ${e.message ?? 'is invalid'}`;
  });
}

function compile<T>(ajv: Ajv2020, schema: { $id: string; title?: string }): Validator<T> {
  let fn: ValidateFunction | undefined;
  const compiled = (): ValidateFunction => {
    fn ??= ajv.getSchema(schema.$id);
    if (!fn) throw new Error(`schema ${schema.$id} is not registered`);
    return fn;
  };
  const name = schema.$id.replace('.schema.json', '');
  let last: string[] = [];
  const check = ((data: unknown): data is T => {
    const validateFn = compiled();
    if (validateFn(data)) return true;
    last = describe(validateFn.errors);
    return false;
  }) as Validator<T>;
  check.parse = (data: unknown): T => {
    if (check(data)) return data;
    throw new SchemaError(name, last);
  };
  check.explain = () => last;
  Object.defineProperty(check, 'schema', { value: schema });
  return check;
}

export const validate = {
  manifest: compile<BundleManifest>(strict, manifest),
  heartbeat: compile<Heartbeat>(strict, heartbeat),
  command: compile<Command>(strict, command),
  result: compile<CommandResult>(strict, result),
  deviceConfig: compile<DeviceConfigMessage>(strict, deviceConfig),
  deviceStatus: compile<DeviceStatusMessage>(strict, deviceStatus),
  fleetEvent: compile<FleetEvent>(strict, fleetEvent),
  registerRequest: compile<RegisterRequest>(strict, registerRequest),
  deploymentRequest: compile<DeploymentRequest>(strict, deploymentRequest),
  rollbackRequest: compile<RollbackRequest>(strict, rollbackRequest),
  resultRequest: compile<ResultRequest>(strict, resultRequest),
  configUpdate: compile<ConfigUpdate>(coercing, configUpdate),
  // REST answers: what clients (the agent's HTTP fallback, kernexctl) may
  // check, and what the OpenAPI document shows.
  heartbeatResponse: compile<HeartbeatResponse>(strict, heartbeatResponse),
  bundleHistoryEntry: compile<BundleHistoryEntry>(strict, bundleHistoryEntry),
  deviceConfigView: compile<DeviceConfigView>(strict, deviceConfigView),
  rollbackResponse: compile<RollbackResponse>(strict, rollbackResponse),
  apiError: compile<ApiErrorBody>(strict, apiError),
  deviceView: compile<DeviceView>(strict, deviceView),
  bundleView: compile<BundleView>(strict, bundleView),
  deploymentView: compile<DeploymentView>(strict, deploymentView),
  registerResponse: compile<RegisterResponse>(strict, registerResponse),
  resultResponse: compile<ResultResponse>(strict, resultResponse),
  tokenRequest: compile<TokenRequest>(strict, tokenRequest),
  fleetSummary: compile<FleetSummary>(strict, fleetSummary),
};

/** Compiles every validator now (a server does, so its first messages do not pay for it). */
export function compileAll(): void {
  for (const v of Object.values(validate)) v(undefined);
}

/** Parses JSON bytes and validates them; throws SchemaError for either failure. */
export function parseJson<T>(validator: Validator<T>, bytes: Buffer | string, name = 'payload'): T {
  let data: unknown;
  try {
    data = JSON.parse(typeof bytes === 'string' ? bytes : bytes.toString('utf8'));
  } catch (err) {
    throw new SchemaError(name, [`malformed JSON: ${(err as Error).message}`]);
  }
  return validator.parse(data);
}

/** The raw schemas, for fastify's route schemas and the OpenAPI document. */
export const schemas = {
  common, manifest, heartbeat, command, result, deviceConfig, deviceStatus, fleetEvent,
  registerRequest, deploymentRequest, rollbackRequest, resultRequest, configUpdate,
  heartbeatResponse, bundleHistoryEntry, deviceConfigView, rollbackResponse, apiError, deviceView, bundleView,
  deploymentView, registerResponse, resultResponse, tokenRequest, fleetSummary,
};
