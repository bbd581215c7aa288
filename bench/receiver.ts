// One receiving process of the fan-out benchmark (started by
// harness/receivers.ts): a slice of the simulated fleet in 'record' mode,
// noting when each device receives a command. One Node process reads its
// sockets one at a time, so a device's receipt time includes the handling of
// every message read before it in the same process; the fleet is spread over
// several of these so that the figure measures the broker, not one event loop.
// Receipt times are wall-clock microseconds, comparable with the parent's.
import { Fleet, wallUs, type BrokerTarget, type DeviceCredentials } from '../sim/index.js';
import { isRequest, type Reply, type Request } from './harness/receiver-protocol.js';

let fleet: Fleet | undefined;
let round: { commandId: string; expect: number; seen: Set<string>; at: number[]; done?: () => void } | undefined;

function reply(message: Reply): void {
  process.send?.(message);
}

async function handle(req: Request): Promise<unknown> {
  switch (req.op) {
    case 'init': {
      fleet = await Fleet.create(req.credentials as DeviceCredentials[], {
        server: req.server, mode: 'record',
        hooks: {
          // Noted first thing on receipt (the device's own handling comes after).
          command: (device, command, at) => {
            const r = round;
            if (!r || (r.commandId !== '*' && command.command_id !== r.commandId) || r.seen.has(device.id)) return;
            r.seen.add(device.id);
            // `at` is this process's monotonic clock; on the wall clock it is comparable with the parent's.
            r.at.push(performance.timeOrigin * 1000 + at);
            if (r.at.length === r.expect) r.done?.();
          },
        },
      });
      return null;
    }
    case 'connect': {
      const report = await need().connect(req.target as BrokerTarget);
      return { connected: report.connected, failed: report.failed, firstError: report.firstError ?? null };
    }
    case 'clock':
      return wallUs();
    case 'arm':
      round = { commandId: req.commandId, expect: req.expect, seen: new Set(), at: [] };
      return null;
    case 'collect': {
      const r = round;
      if (!r) throw new Error('collect before arm');
      if (r.at.length < r.expect) {
        await new Promise<void>((resolve) => {
          const timer = setTimeout(resolve, req.timeoutMs);
          r.done = () => {
            clearTimeout(timer);
            resolve();
          };
        });
      }
      round = undefined;
      return { at: r.at };
    }
    case 'settle':
      await need().settle();
      return null;
    case 'end':
      await need().end();
      return null;
  }
}

function need(): Fleet {
  if (!fleet) throw new Error('receiver not initialised');
  return fleet;
}

process.on('message', (message: unknown) => {
  if (!isRequest(message)) {
    reply({ id: -1, error: `malformed request: ${JSON.stringify(message).slice(0, 200)}` });
    return;
  }
  handle(message).then(
    (result) => reply({ id: message.id, result }),
    (err: Error) => reply({ id: message.id, error: err.message }),
  );
});
// The parent going away ends this process.
process.on('disconnect', () => process.exit(0));
