// The agent's HTTP client. With a CA file configured (a controller with a
// self-signed or private-CA certificate), requests trust exactly that CA;
// otherwise the system's trust store applies. Node's built-in fetch cannot
// take a CA, so undici's own fetch carries it.
import { Agent, fetch as undiciFetch } from 'undici';

export function createFetch(ca?: string): typeof fetch {
  if (!ca) return fetch;
  const dispatcher = new Agent({ connect: { ca } });
  const withCa = (input: Parameters<typeof undiciFetch>[0], init?: Parameters<typeof undiciFetch>[1]) =>
    undiciFetch(input, { ...init, dispatcher });
  // Same WHATWG fetch contract; undici's types name their classes separately.
  return withCa as unknown as typeof fetch;
}
