// A bare Aedes broker for the benchmarks' reference figures: the same broker
// library Kernex embeds, without authentication, ACL, handlers or store.
// Prints {"port": N} once listening.
import { Aedes } from 'aedes';
import { createServer } from 'node:net';

const aedes = await Aedes.createBroker();
const server = createServer(aedes.handle);
server.listen(0, '127.0.0.1', () => {
  process.stdout.write(JSON.stringify({ port: (server.address() as { port: number }).port }) + '\n');
});
const stop = () => server.close(() => aedes.close(() => process.exit(0)));
process.on('SIGTERM', stop);
process.on('SIGINT', stop);
