// pino for every process: JSON by default, pretty when a person is watching.
import pino, { type Logger } from 'pino';

export function createLogger(level: string, name: string): Logger {
  const pretty = process.stdout.isTTY && !process.env.KERNEX_LOG_JSON;
  return pino({
    name,
    level,
    ...(pretty ? { transport: { target: 'pino-pretty', options: { translateTime: 'SYS:HH:MM:ss.l', ignore: 'pid,hostname' } } } : {}),
  });
}
