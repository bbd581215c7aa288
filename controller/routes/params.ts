// Path and query parameters, checked before they reach a query.
import { badRequest } from '../errors.js';

const DEVICE_ID = /^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$/;
const ID = /^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/;

export function deviceIdParam(params: unknown): string {
  const value = (params as Record<string, unknown>).device_id;
  if (typeof value !== 'string' || !DEVICE_ID.test(value)) throw badRequest(`invalid device id '${String(value)}'`);
  return value;
}

export function idParam(params: unknown, name = 'id'): string {
  const value = (params as Record<string, unknown>)[name];
  if (typeof value !== 'string' || !ID.test(value)) throw badRequest(`invalid ${name} '${String(value)}'`);
  return value;
}

/** An optional integer query parameter within bounds; absent gives `fallback`. */
export function intQuery(query: unknown, name: string, fallback: number, min: number, max: number): number {
  const raw = (query as Record<string, unknown>)[name];
  if (raw === undefined || raw === '') return fallback;
  const n = Number(raw);
  if (typeof raw !== 'string' || !Number.isInteger(n) || n < min || n > max) {
    throw badRequest(`${name} must be an integer between ${min} and ${max}`);
  }
  return n;
}

export function enumQuery<T extends string>(query: unknown, name: string, allowed: readonly T[]): T | undefined {
  const raw = (query as Record<string, unknown>)[name];
  if (raw === undefined || raw === '') return undefined;
  if (typeof raw !== 'string' || !allowed.includes(raw as T)) throw badRequest(`${name} must be one of ${allowed.join(', ')}`);
  return raw as T;
}
