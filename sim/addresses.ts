// One loopback address has only so many ephemeral ports (the kernel's
// ip_local_port_range, 28k by default). A fleet larger than that, or a
// reconnect storm whose old sockets still sit in TIME_WAIT, needs several
// source addresses: every 127.0.0.x is local on Linux.
import { readFileSync } from 'node:fs';

/** Ephemeral ports per source address, from the kernel setting (28,232 when unreadable). */
export function ephemeralPorts(): number {
  try {
    const [low, high] = readFileSync('/proc/sys/net/ipv4/ip_local_port_range', 'utf8').trim().split(/\s+/).map(Number);
    if (low && high && high > low) return high - low + 1;
  } catch {
    // not Linux, or /proc hidden: use Linux's default range
  }
  return 60999 - 32768 + 1;
}

/**
 * The source address for each of `n` connections, or undefined when one
 * address suffices. Each address carries at most `perAddress` connections:
 * by default 45% of its ports, leaving room for a full reconnect while the
 * previous sockets are still in TIME_WAIT.
 */
export function sourceAddresses(n: number, perAddress = Math.floor(ephemeralPorts() * 0.45)): ((i: number) => string) | undefined {
  const count = Math.ceil(n / Math.max(1, perAddress));
  if (count <= 1) return undefined;
  if (count > 253) throw new Error(`${n} connections need ${count} source addresses; at most 253 (127.0.0.2-254) are used`);
  // Round robin from 127.0.0.2, so every address holds an equal share.
  return (i: number) => `127.0.0.${2 + (i % count)}`;
}
