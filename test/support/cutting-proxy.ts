// A TCP proxy in front of the controller's HTTP port that plays a bad link:
// the first `cuts` bundle downloads are cut off after `cutAfterBytes` bytes of
// response, and one response byte past the cut can be flipped (`corruptAt`) to
// play a link that also damages data. Everything else passes through.
import { createConnection, createServer, type Socket } from 'node:net';

export interface CuttingProxy {
  url: string;
  /** The request heads of bundle downloads, in order (to see their Range headers). */
  downloads: string[];
  cutsDone: number;
  close(): Promise<void>;
}

const BUNDLE_GET = /^GET \/api\/v1\/bundles\/[^/\s]+ HTTP/;

export async function startCuttingProxy(opts: {
  targetPort: number;
  cuts: number;
  cutAfterBytes: number;
  /** Flip the byte at this offset of the response that follows the last cut (headers included). */
  corruptAt?: number;
}): Promise<CuttingProxy> {
  const sockets = new Set<Socket>();
  const state: CuttingProxy = {
    url: '',
    downloads: [],
    cutsDone: 0,
    close: () => new Promise<void>((resolve) => {
      for (const s of sockets) s.destroy();
      server.close(() => resolve());
    }),
  };
  const server = createServer((client) => {
    const upstream = createConnection({ host: '127.0.0.1', port: opts.targetPort });
    sockets.add(client).add(upstream);
    client.on('close', () => sockets.delete(client));
    upstream.on('close', () => sockets.delete(upstream));
    // What the current request on this connection is, and what its response has passed.
    let download = false;
    let corrupting = false;
    let passed = 0;
    client.on('data', (chunk: Buffer) => {
      const head = chunk.toString('latin1');
      if (/^[A-Z]+ \//.test(head)) {
        download = BUNDLE_GET.test(head);
        corrupting = download && opts.corruptAt !== undefined && state.cutsDone === opts.cuts && state.downloads.length === opts.cuts;
        passed = 0;
        if (download) state.downloads.push(head.split('\r\n\r\n')[0]!);
      }
      upstream.write(chunk);
    });
    upstream.on('data', (chunk: Buffer) => {
      if (upstream.destroyed) return;
      if (download && corrupting && opts.corruptAt !== undefined && passed <= opts.corruptAt && opts.corruptAt < passed + chunk.length) {
        chunk = Buffer.from(chunk);
        chunk[opts.corruptAt - passed] ^= 0xff;
      }
      if (download && state.cutsDone < opts.cuts && passed + chunk.length > opts.cutAfterBytes) {
        state.cutsDone += 1;
        // The bytes up to the cut reach the device, the link stalls, then the
        // connection ends mid-body. (A stream that errors drops what its reader
        // has not taken yet: the stall lets the device take what it received.)
        client.write(chunk.subarray(0, opts.cutAfterBytes - passed));
        passed = opts.cutAfterBytes;
        download = false;
        upstream.destroy();
        setTimeout(() => client.end(), 300);
        return;
      }
      passed += chunk.length;
      client.write(chunk);
    });
    client.on('error', () => upstream.destroy());
    upstream.on('error', () => client.destroy());
    client.on('end', () => upstream.end());
    upstream.on('end', () => client.end());
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  state.url = `http://127.0.0.1:${(server.address() as { port: number }).port}`;
  return state;
}
