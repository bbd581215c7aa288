#!/usr/bin/env node
// `kernex server` runs the control plane; `kernex agent` runs a device;
// `kernex simulate` runs a simulated fleet against a controller.
import yargs from 'yargs';
import { hideBin } from 'yargs/helpers';
import { createLogger } from './logger.js';
import { loadControllerConfig, startController, ConfigError, VERSION } from '../controller/index.js';
import { loadAgentConfig, startAgent, AgentConfigError, EnrollmentError } from '../agent/index.js';
import { simulate, RegistrationError } from '../sim/index.js';

/**
 * Runs until SIGINT/SIGTERM, then stops cleanly and exits 0; a second signal,
 * or a stop that takes longer than `forceAfterMs`, forces the exit (code 1).
 */
function untilSignal(
  stop: () => Promise<void>,
  logger: { info: (m: string) => void; error: (o: object, m: string) => void },
  forceAfterMs = 15_000,
) {
  let stopping = false;
  const onSignal = (signal: string) => {
    if (stopping) process.exit(130);
    stopping = true;
    logger.info(`${signal} received, shutting down`);
    const force = setTimeout(() => {
      logger.error({ forceAfterMs }, 'shutdown took too long; exiting anyway');
      process.exit(1);
    }, forceAfterMs);
    force.unref();
    stop().then(
      () => process.exit(0),
      (err: Error) => {
        logger.error({ err }, 'shutdown failed');
        process.exit(1);
      },
    );
  };
  process.on('SIGINT', () => onSignal('SIGINT'));
  process.on('SIGTERM', () => onSignal('SIGTERM'));
}

function fail(message: string): never {
  process.stderr.write(`kernex: ${message}\n`);
  process.exit(2);
}

await yargs(hideBin(process.argv))
  .scriptName('kernex')
  .version(VERSION)
  .command(
    'server',
    'run the control plane (REST API, embedded MQTT broker, store)',
    (y) => y
      .option('data-dir', { type: 'string', describe: 'where data lives [KERNEX_DATA_DIR, default ./.kernex]' })
      .option('http-port', { type: 'number', describe: 'REST API port [KERNEX_HTTP_PORT, default 8000]' })
      .option('mqtt-port', { type: 'number', describe: 'MQTT port [KERNEX_MQTT_PORT, default 1883]' })
      .option('host', { type: 'string', describe: 'bind address for both [KERNEX_HTTP_HOST/KERNEX_MQTT_HOST, default 0.0.0.0]' })
      .option('log-level', { type: 'string', describe: 'trace|debug|info|warn|error [KERNEX_LOG_LEVEL]' }),
    async (argv) => {
      let config;
      try {
        config = loadControllerConfig({
          dataDir: argv.dataDir, httpPort: argv.httpPort, mqttPort: argv.mqttPort,
          httpHost: argv.host, mqttHost: argv.host, logLevel: argv.logLevel,
        });
      } catch (err) {
        if (err instanceof ConfigError) fail(err.message);
        throw err;
      }
      const logger = createLogger(config.logLevel, 'kernex');
      let controller;
      try {
        controller = await startController(config, logger);
      } catch (err) {
        const e = err as NodeJS.ErrnoException;
        if (e.code === 'EADDRINUSE') fail(`${e.message}: another process uses that port; pick another with --http-port/--mqtt-port`);
        // Unreachable MongoDB, Redis or S3: their messages say where and what to check.
        logger.debug({ err }, 'start-up failed');
        fail(`cannot start: ${e.message}`);
      }
      logger.info(
        { http: controller.httpUrl, mqtt: controller.mqttUrl, dataDir: config.dataDir, credentials: controller.credentialsFile },
        `Kernex ${VERSION} listening: REST ${controller.httpUrl}/api/v1, MQTT ${controller.mqttUrl}; ` +
          `admin and enrollment tokens are in ${controller.credentialsFile}`,
      );
      untilSignal(() => controller.stop(), logger);
      // Certificate rotation without a restart, as for nginx or mosquitto.
      if (config.tls) {
        process.on('SIGHUP', () => {
          try {
            controller.reloadTls();
          } catch (err) {
            logger.error({ err: (err as Error).message }, 'TLS certificate not reloaded; the previous one stays in use');
          }
        });
      }
    },
  )
  .command(
    'agent',
    'run the device agent',
    (y) => y
      .option('device-id', { type: 'string', describe: 'this device\'s id [KERNEX_DEVICE_ID]' })
      .option('server', { type: 'string', describe: 'controller URL [KERNEX_SERVER, default http://127.0.0.1:8000]' })
      .option('mqtt-url', { type: 'string', describe: 'override the MQTT URL given at registration [KERNEX_AGENT_MQTT_URL]' })
      .option('data-dir', { type: 'string', describe: 'agent state and bundles [KERNEX_AGENT_DATA_DIR, default ./.kernex-agent/<id>]' })
      .option('enrollment-token', { type: 'string', describe: 'token to register with [KERNEX_ENROLLMENT_TOKEN]' })
      .option('polling-interval', { type: 'number', describe: 'heartbeat seconds until configured [default 60]' })
      .option('deploy-timeout', { type: 'number', describe: 'script timeout seconds until configured [default 300]' })
      .option('keep-bundles', { type: 'number', describe: 'successful bundles kept for rollback [default 3]' })
      .option('ca-file', { type: 'string', describe: 'CA certificate (PEM) to trust for HTTPS/MQTTS [KERNEX_AGENT_CA_FILE]' })
      .option('trusted-keys', {
        type: 'string', array: true,
        describe: 'public key file or directory; only bundles signed by these keys run (repeatable) [KERNEX_AGENT_TRUSTED_KEYS, comma-separated]',
      })
      .option('shutdown-grace', {
        type: 'number', describe: 'seconds a running script may finish when the agent stops [KERNEX_AGENT_SHUTDOWN_GRACE, default 10]',
      })
      .option('log-level', { type: 'string', describe: 'trace|debug|info|warn|error [KERNEX_LOG_LEVEL]' }),
    async (argv) => {
      let config;
      try {
        config = loadAgentConfig({
          deviceId: argv.deviceId, server: argv.server, mqttUrl: argv.mqttUrl, dataDir: argv.dataDir,
          enrollmentToken: argv.enrollmentToken, pollingInterval: argv.pollingInterval, deployTimeout: argv.deployTimeout,
          keepBundles: argv.keepBundles, logLevel: argv.logLevel, caFile: argv.caFile,
          trustedKeys: argv.trustedKeys?.flatMap((k) => k.split(',')), shutdownGrace: argv.shutdownGrace,
        });
      } catch (err) {
        if (err instanceof AgentConfigError) fail(err.message);
        throw err;
      }
      const logger = createLogger(config.logLevel, 'kernex-agent');
      let agent;
      try {
        agent = await startAgent(config, logger);
      } catch (err) {
        if (err instanceof EnrollmentError || err instanceof AgentConfigError) fail(err.message);
        if ((err as Error).cause && /fetch failed/.test((err as Error).message)) {
          fail(`cannot reach the controller at ${config.server}: is it running?`);
        }
        throw err;
      }
      logger.info({ deviceId: config.deviceId, dataDir: config.dataDir }, 'agent started');
      // The grace for a running script, its kill (a few seconds) and the last acknowledgement.
      untilSignal(() => agent.stop(), logger, config.shutdownGrace * 1000 + 10_000);
    },
  )
  .command(
    'simulate',
    'run N simulated devices (one MQTT connection each) against a controller',
    (y) => y
      .option('devices', { type: 'number', default: 100, describe: 'how many devices' })
      .option('server', { type: 'string', describe: 'controller URL [KERNEX_SERVER, default http://127.0.0.1:8000]' })
      .option('enrollment-token', { type: 'string', describe: 'token to register with [KERNEX_ENROLLMENT_TOKEN]' })
      .option('prefix', { type: 'string', default: 'sim', describe: 'device ids are <prefix>-00001, ...' })
      .option('heartbeat', { type: 'number', default: 60, describe: 'seconds between a device\'s heartbeats (0: none)' })
      .option('mqtt-url', { type: 'string', describe: 'override the MQTT URL given at registration' })
      .option('run-scripts', { type: 'boolean', default: false, describe: 'extract bundles and run their scripts (a process per device)' })
      .option('shared-download', { type: 'boolean', default: false, describe: 'download each bundle once for the whole fleet' })
      .option('register-concurrency', { type: 'number', default: 32, describe: 'registrations in flight' })
      .option('connect-concurrency', { type: 'number', default: 256, describe: 'MQTT handshakes in flight' })
      .option('duration', { type: 'number', describe: 'stop after this many seconds (default: until Ctrl-C)' })
      .option('log-level', { type: 'string', default: 'info', describe: 'trace|debug|info|warn|error' }),
    async (argv) => {
      const server = argv.server ?? process.env.KERNEX_SERVER ?? 'http://127.0.0.1:8000';
      const enrollmentToken = argv.enrollmentToken ?? process.env.KERNEX_ENROLLMENT_TOKEN;
      if (!enrollmentToken) fail('pass --enrollment-token (or KERNEX_ENROLLMENT_TOKEN): the simulated devices register with it');
      if (!Number.isInteger(argv.devices) || argv.devices < 1) fail(`--devices must be a positive integer, got ${argv.devices}`);
      const logger = createLogger(argv.logLevel, 'kernex-sim');
      let sim;
      try {
        sim = await simulate({
          server, enrollmentToken, devices: argv.devices, prefix: argv.prefix, heartbeatSeconds: argv.heartbeat,
          mqttUrl: argv.mqttUrl, runScripts: argv.runScripts, sharedDownloads: argv.sharedDownload,
          registerConcurrency: argv.registerConcurrency, connectConcurrency: argv.connectConcurrency, logger,
        });
      } catch (err) {
        if (err instanceof RegistrationError) fail(err.message);
        throw err;
      }
      const running = sim;
      if (argv.duration) setTimeout(() => void running.stop().then(() => process.exit(0)), argv.duration * 1000);
      untilSignal(() => running.stop(), logger);
    },
  )
  .demandCommand(1, 'name a command: server, agent or simulate')
  .strict()
  .help()
  .parseAsync();
