// Responses checked against the schemas the OpenAPI document shows.
import type { Validator } from '../../schemas/index.js';

export function expectShape<T>(validator: Validator<T>, data: unknown): T {
  if (!validator(data)) {
    throw new Error(`does not match its documented schema: ${validator.explain().join('; ')}\n${JSON.stringify(data)}`);
  }
  return data;
}
