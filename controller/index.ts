// The controller process: store, blobs, services, the embedded broker and the
// REST API, started and stopped as one.
import { randomUUID } from 'node:crypto';
import { mkdir } from 'node:fs/promises';
import { createSecureContext, type Server as TlsServer } from 'node:tls';
import type { Logger } from 'pino';
import type { FastifyInstance } from 'fastify';
import { createBroker, type Broker } from '../broker/index.js';
import { openStore, type Store } from './store/index.js';
import { openBlobStore, type BlobStore } from './blobs/index.js';
import { openRepositories } from './model.js';
import { createServices, type Services } from './services/index.js';
import { createFleetPublisher } from './mqtt/publisher.js';
import { createBrokerHooks, type MessageCounters } from './mqtt/handlers.js';
import { createHttpApp } from './http.js';
import { compileAll } from '../schemas/index.js';
import { ConfigError, readTlsFiles, scaleOutWarnings, type ControllerConfig, type S3Settings, type TlsSettings } from './config.js';

export { loadControllerConfig, ConfigError, CONTROLLER_ENV, scaleOutWarnings, type ControllerConfig, type ControllerFlags } from './config.js';
export { VERSION } from './version.js';

export interface Controller {
  readonly config: ControllerConfig;
  readonly httpUrl: string;
  readonly mqttUrl: string;
  readonly httpPort: number;
  readonly mqttPort: number;
  /** MQTT over TLS, when TLS is configured. */
  readonly mqttsPort: number | null;
  readonly mqttsUrl: string | null;
  /** MQTT over WebSocket (wss:// with TLS), or null when disabled. */
  readonly wsUrl: string | null;
  readonly credentialsFile: string;
  readonly services: Services;
  readonly broker: Broker;
  readonly counters: MessageCounters;
  /**
   * Reads the TLS certificate, key and CA files again and serves them to new
   * HTTPS, MQTTS and WSS connections (SIGHUP on `kernex server`). On any error
   * the certificates in use stay, and the error says why.
   */
  reloadTls(): void;
  stop(): Promise<void>;
}

/** Node's TLS options from the settings: the chain is the certificate followed by its CA certificates. */
function serverTls(t: TlsSettings): { cert: string; key: string } {
  return { cert: t.ca ? `${t.cert}\n${t.ca}` : t.cert, key: t.key };
}

const hostFor = (bind: string) => (bind === '0.0.0.0' || bind === '::' ? '127.0.0.1' : bind);

export interface ControllerDeps {
  /**
   * A store opened (and closed) by the caller instead of the one the config
   * names: several controllers in one process can share it, as several
   * processes share MongoDB.
   */
  store?: Store;
}

export async function startController(config: ControllerConfig, logger: Logger, deps: ControllerDeps = {}): Promise<Controller> {
  await mkdir(config.dataDir, { recursive: true });
  for (const warning of scaleOutWarnings(config)) logger.warn(warning);
  compileAll();
  const ownStore: Store | undefined = deps.store
    ? undefined
    : await openStore({ mongoUrl: config.mongoUrl, dataDir: config.dataDir, inMemory: config.inMemoryStore });
  const store: Store = deps.store ?? ownStore!;
  let blobs: BlobStore;
  try {
    blobs = await openBlobStore({ dataDir: config.dataDir, s3: config.s3 }).catch((err: Error) => {
      throw config.s3 ? s3Unavailable(config.s3, err) : err;
    });
  } catch (err) {
    await ownStore?.close().catch(() => {});
    throw err;
  }
  const repos = await openRepositories(store);
  const counters: MessageCounters = { dropped: 0, ignored: 0, failed: 0, results: 0 };

  // The broker's hooks and the services need each other: the hooks reach the
  // services through this late-bound reference.
  let services!: Services;
  const broker = await createBroker(
    {
      id: brokerId(config.instanceId),
      persistence: config.redisUrl ? { kind: 'redis', url: config.redisUrl } : { kind: 'memory' },
      limits: config.broker,
      heartbeatIntervalMs: BROKER_HEARTBEAT_MS,
    },
    {
      authenticate: (...a) => hooks.authenticate(...a),
      deviceMessage: (...a) => hooks.deviceMessage(...a),
      clientReady: (...a) => hooks.clientReady?.(...a),
      clientGone: (...a) => hooks.clientGone?.(...a),
      subscribed: (...a) => hooks.subscribed?.(...a),
      revoked: (...a) => hooks.revoked?.(...a),
    },
    logger.child({ component: 'broker' }),
  ).catch(async (err: unknown) => {
    await blobs.close().catch(() => {});
    await ownStore?.close().catch(() => {});
    throw err;
  });
  const publisher = createFleetPublisher(broker, logger);
  services = createServices({
    repos, blobs, publisher, logger, heartbeatFlushMs: config.heartbeatFlushMs, maxBundleBytes: config.maxBundleBytes,
    registrationProof: { policy: config.registrationProof, maxSkewSeconds: config.registrationMaxSkewSeconds },
    announceRevocation: (r) => broker.announceRevocation(r),
    sweepIntervalMs: config.sweepIntervalMs,
    instanceId: config.instanceId,
  });
  if (config.registrationProof === 'optional') {
    logger.warn('KERNEX_REGISTRATION_PROOF=optional: devices may register without proving they hold their private key');
  }
  const hooks = createBrokerHooks({
    devices: services.devices, deployments: services.deployments, tokens: services.tokens, access: services.access,
    logger: logger.child({ component: 'mqtt' }), counters,
  });
  // Alone, this process held every MQTT connection; on a shared Redis-backed
  // broker, only those marked as its own.
  await services.devices.start(config.redisUrl ? 'own' : 'all');
  // A broker that keeps retained messages in memory starts empty: give it
  // back every device's latest configuration before devices connect.
  if (!config.redisUrl) await services.configs.republishAll();
  // Before any device connects: completes what a crash left half-recorded, then enforces timeouts periodically.
  await services.sweeper.start();
  // On a shared Redis, devices held by an instance that died and that did
  // not come back elsewhere would stay "online": each instance sweeps them.
  const orphanSweep = config.redisUrl
    ? setInterval(() => {
        const alive = broker.peers().map(instanceOf);
        services.devices.sweepOrphans(alive, 3 * BROKER_HEARTBEAT_MS).catch((err: Error) =>
          logger.warn({ err: err.message }, 'could not sweep devices of controller instances that are gone'));
      }, BROKER_HEARTBEAT_MS).unref()
    : undefined;

  let app: FastifyInstance | undefined;
  try {
    const tls = config.tls ? serverTls(config.tls) : undefined;
    const mqttAddress = await broker.listenTcp(config.mqttPort, config.mqttHost);
    const mqttsAddress = tls ? await broker.listenTls(config.mqttsPort, config.mqttHost, tls) : null;
    // What devices are told at registration: TLS when the controller has a certificate.
    const deviceMqttUrl = (hostname: string) =>
      config.publicMqttUrl ??
      (mqttsAddress ? `mqtts://${hostname}:${mqttsAddress.port}` : `mqtt://${hostname}:${mqttAddress.port}`);
    app = await createHttpApp({
      services, logger, deviceMqttUrl, maxBundleBytes: config.maxBundleBytes, https: tls, docsUi: config.docsUi,
    });
    if (config.mqttWsPath) broker.attachWebSocket(app.server, config.mqttWsPath);
    await app.listen({ port: config.httpPort, host: config.httpHost });
    const httpPort = (app.server.address() as { port: number }).port;
    const scheme = tls ? 'https' : 'http';
    const httpUrl = config.publicHttpUrl ?? `${scheme}://${hostFor(config.httpHost)}:${httpPort}`;
    const mqttUrl = config.publicMqttUrl ?? `mqtt://${hostFor(config.mqttHost)}:${mqttAddress.port}`;
    const mqttsUrl = mqttsAddress ? `mqtts://${hostFor(config.mqttHost)}:${mqttsAddress.port}` : null;
    const wsUrl = config.mqttWsPath ? `${tls ? 'wss' : 'ws'}://${hostFor(config.httpHost)}:${httpPort}${config.mqttWsPath}` : null;
    const { file } = await services.tokens.bootstrap(config.dataDir, { server: httpUrl, mqtt: mqttsUrl ?? mqttUrl });

    let stopping: Promise<void> | undefined;
    const httpApp = app;
    return {
      config, httpUrl, mqttUrl, httpPort, mqttPort: mqttAddress.port, credentialsFile: file, services, broker, counters,
      mqttsPort: mqttsAddress?.port ?? null, mqttsUrl, wsUrl,
      reloadTls() {
        if (!config.tls) throw new ConfigError('TLS is not configured (KERNEX_TLS_CERT, KERNEX_TLS_KEY): nothing to reload');
        const next = serverTls(readTlsFiles(config.tls));
        // Both checked before either is changed: a key that does not fit throws here.
        createSecureContext(next);
        (httpApp.server as unknown as TlsServer).setSecureContext(next);
        broker.setTlsContext(next);
        logger.info({ certFile: config.tls.certFile }, 'TLS certificate reloaded');
      },
      // Stop taking work, finish what is under way, flush, then close: HTTP
      // requests in progress complete (the broker is still up for the commands
      // they publish); then no more MQTT connections or messages, and the
      // results being recorded finish before the store closes.
      stop() {
        stopping ??= (async () => {
          logger.info('controller stopping');
          clearInterval(orphanSweep);
          await httpApp.close();
          await broker.close();
          await hooks.drain();
          await services.sweeper.stop();
          await services.devices.stop();
          await blobs.close();
          await ownStore?.close();
          logger.info('controller stopped');
        })();
        return stopping;
      },
    };
  } catch (err) {
    clearInterval(orphanSweep);
    await app?.close().catch(() => {});
    await services.sweeper.stop().catch(() => {});
    await services.devices.stop().catch(() => {});
    await broker.close().catch(() => {});
    await blobs.close().catch(() => {});
    await ownStore?.close().catch(() => {});
    throw err;
  }
}

/** How often each controller's broker announces itself on a shared Redis; 3 silent intervals mean it is gone. */
const BROKER_HEARTBEAT_MS = 15_000;

/**
 * The broker id: the instance id and a suffix unique per process start.
 * Aedes numbers the messages it stores per broker id from 0, so a restarted
 * broker reusing its id would overwrite messages still queued in Redis for
 * offline devices. `~` cannot occur in an instance id.
 */
const brokerId = (instanceId: string) => `${instanceId}~${randomUUID().slice(0, 8)}`;
const instanceOf = (id: string) => id.split('~')[0]!;

/** Why the S3 store could not be opened, saying where it was looked for (never with the secret). */
function s3Unavailable(s3: S3Settings, err: Error): Error {
  const where = `${s3.useSSL === false ? 'http' : 'https'}://${s3.endPoint}${s3.port ? `:${s3.port}` : ''}`;
  return new Error(
    `cannot use S3 bucket '${s3.bucket}' at ${where} (${err.message}). ` +
      'Check that the server is reachable and the KERNEX_S3_* settings (or KERNEX_S3_URL) are right.',
    { cause: err },
  );
}
