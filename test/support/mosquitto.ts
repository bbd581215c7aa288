// mosquitto_sub as an independent observer: each message with the time it
// arrived (mosquitto's own clock, %U), topic and payload.
import { spawn } from 'node:child_process';

export interface Seen {
  at: number;
  topic: string;
  payload: string;
}

export function mosquittoSub(port: number, token: string, topics: string[], clientId = `obs-${process.pid}-${Date.now()}`) {
  const args = ['-h', '127.0.0.1', '-p', String(port), '-i', clientId, '-u', 'observer', '-P', token, '-F', '%U %t %p'];
  for (const t of topics) args.push('-t', t);
  const child = spawn('mosquitto_sub', args);
  const seen: Seen[] = [];
  let buffer = '';
  let errors = '';
  child.stdout.on('data', (d: Buffer) => {
    buffer += d.toString();
    let nl: number;
    while ((nl = buffer.indexOf('\n')) >= 0) {
      const line = buffer.slice(0, nl);
      buffer = buffer.slice(nl + 1);
      const m = /^(\d+\.\d+) (\S+) (.*)$/.exec(line);
      if (m) seen.push({ at: Number(m[1]), topic: m[2]!, payload: m[3]! });
    }
  });
  child.stderr.on('data', (d: Buffer) => (errors += d.toString()));
  return {
    seen,
    errors: () => errors,
    json: (topic?: string) => seen.filter((s) => !topic || s.topic === topic).map((s) => ({ at: s.at, ...JSON.parse(s.payload) })),
    stop: () => new Promise<void>((r) => {
      if (child.exitCode !== null) return r();
      child.once('exit', () => r());
      child.kill();
    }),
  };
}
