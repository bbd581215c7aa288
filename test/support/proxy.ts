// A tiny TCP load balancer for tests (node:net): devices connect to one
// address and reach whichever controller is up, as behind HAProxy or a cloud
// load balancer with health checks.
import { createServer, connect, type Server, type Socket } from 'node:net';

export interface TcpProxy {
  port: number;
  /** Targets tried in order for each new connection; a refused one is skipped. */
  route(targets: number[]): void;
  /** Connections currently forwarded, with the target each went to. */
  connections(): Array<{ target: number }>;
  /**
   * Cuts the device side of every connection but leaves the controller side
   * open, as a network failure between device and balancer would: the
   * controller learns of it only later.
   */
  severDeviceSides(): void;
  close(): Promise<void>;
}

export async function startTcpProxy(targets: number[]): Promise<TcpProxy> {
  let order = [...targets];
  const live = new Set<{ down: Socket; up: Socket; target: number }>();
  const dangling = new Set<Socket>();

  const forward = (down: Socket, candidates: number[]) => {
    const [target, ...rest] = candidates;
    if (target === undefined) {
      down.destroy();
      return;
    }
    const up = connect(target, '127.0.0.1');
    const pair = { down, up, target };
    let connected = false;
    up.once('connect', () => {
      connected = true;
      live.add(pair);
      down.pipe(up);
      up.pipe(down);
      down.resume();
    });
    up.on('error', () => {
      if (!connected) forward(down, rest);
    });
    up.on('close', () => {
      live.delete(pair);
      dangling.delete(up);
      if (connected) down.destroy();
    });
    down.on('close', () => {
      live.delete(pair);
      if (!dangling.has(up)) up.destroy();
    });
  };

  const server: Server = createServer((down) => {
    down.pause();
    down.on('error', () => {});
    forward(down, order);
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  return {
    port: (server.address() as { port: number }).port,
    route(next) {
      order = [...next];
    },
    connections: () => [...live].map((p) => ({ target: p.target })),
    severDeviceSides() {
      for (const pair of live) {
        dangling.add(pair.up);
        pair.down.unpipe(pair.up);
        pair.up.unpipe(pair.down);
        pair.down.destroy();
      }
      live.clear();
    },
    async close() {
      for (const pair of live) {
        pair.down.destroy();
        pair.up.destroy();
      }
      for (const up of dangling) up.destroy();
      await new Promise<void>((r) => server.close(() => r()));
    },
  };
}
