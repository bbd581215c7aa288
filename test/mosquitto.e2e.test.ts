// A client nobody here wrote: Mosquitto's command-line tools against the
// embedded broker, with operator and device credentials.
import { spawn, execFile } from 'node:child_process';
import { promisify } from 'node:util';
import { startTestController, waitFor, type TestController } from './support/controller.js';
import { startAgentProcess, type AgentProcess } from './support/agent.js';
import { hasProgram } from './support/programs.js';
import { packBundle, scriptBundle } from './support/bundles.js';

const run = promisify(execFile);
const enabled = hasProgram('mosquitto_sub') && hasProgram('mosquitto_pub');
const describeIf = enabled ? describe : describe.skip;

describeIf('mosquitto clients', () => {
  let tc: TestController;
  let agentA: AgentProcess;

  beforeAll(async () => {
    tc = await startTestController();
    agentA = await startAgentProcess({ deviceId: 'mq-a', server: tc.controller.httpUrl, enrollmentToken: tc.creds.enrollment_token });
    await waitFor(async () => (await tc.api.get('/devices/mq-a')).body.status === 'online', 'mq-a online');
  });
  afterAll(async () => {
    await agentA?.stop();
    await tc?.stop();
  });

  const port = () => String(tc.controller.mqttPort);

  function subscribe(args: string[]) {
    const child = spawn('mosquitto_sub', ['-h', '127.0.0.1', '-p', port(), '-v', ...args]);
    let out = '';
    child.stdout.on('data', (d: Buffer) => (out += d.toString()));
    child.stderr.on('data', (d: Buffer) => (out += d.toString()));
    return { output: () => out, stop: () => child.kill() };
  }

  test('an operator sees status and results of a device with mosquitto_sub', async () => {
    const sub = subscribe(['-i', 'ops-watch', '-u', 'ops', '-P', tc.creds.token, '-t', 'kernex/devices/+/status', '-t', 'kernex/devices/+/results']);
    try {
      // The retained status arrives at once.
      await waitFor(() => /kernex\/devices\/mq-a\/status \{.*"status":"online"/.test(sub.output()), 'retained status', 10_000);
      await tc.api.upload(await packBundle(scriptBundle('9.0.0', '/dev/null')));
      await tc.api.post('/deployments', { bundle_version: '9.0.0', target_device_ids: ['mq-a'] });
      await waitFor(() => /kernex\/devices\/mq-a\/results \{.*"status":"success"/.test(sub.output()), 'result over mqtt', 20_000);
    } finally {
      sub.stop();
    }
  });

  test('a device credential cannot publish on another device\'s topic', async () => {
    const state = JSON.parse(await (await import('node:fs/promises')).readFile(`${agentA.dataDir}/state.json`, 'utf8'));
    const other = await startAgentProcess({ deviceId: 'mq-b', server: tc.controller.httpUrl, enrollmentToken: tc.creds.enrollment_token });
    try {
      await waitFor(async () => (await tc.api.get('/devices/mq-b')).body.status === 'online', 'mq-b online');
      await other.stop();
      await waitFor(async () => (await tc.api.get('/devices/mq-b')).body.status === 'offline', 'mq-b offline');
      const sub = subscribe(['-i', 'ops-watch-2', '-u', 'ops', '-P', tc.creds.token, '-t', 'kernex/devices/mq-b/#']);
      await new Promise((r) => setTimeout(r, 300));
      const forged = JSON.stringify({ status: 'online', bundle_version: 'forged', uptime: 1 });
      // mq-a's credentials, mq-b's topic: the broker closes the connection and forwards nothing.
      await run('mosquitto_pub', ['-h', '127.0.0.1', '-p', port(), '-i', 'mq-a', '-u', 'mq-a', '-P', state.token,
        '-q', '1', '-t', 'kernex/devices/mq-b/heartbeat', '-m', forged]).catch(() => {});
      // The same credentials on its own topic are accepted, which shows the login itself worked.
      await run('mosquitto_pub', ['-h', '127.0.0.1', '-p', port(), '-i', 'mq-a', '-u', 'mq-a', '-P', state.token,
        '-q', '1', '-t', 'kernex/devices/mq-a/heartbeat', '-m', JSON.stringify({ status: 'online', uptime: 2 })]);
      await new Promise((r) => setTimeout(r, 500));
      sub.stop();
      expect(sub.output()).not.toContain('forged');
      const b = (await tc.api.get('/devices/mq-b')).body;
      expect(b.status).toBe('offline');
      // A wrong password is refused outright.
      await expect(run('mosquitto_pub', ['-h', '127.0.0.1', '-p', port(), '-i', 'mq-a', '-u', 'mq-a', '-P', 'wrong',
        '-q', '1', '-t', 'kernex/devices/mq-a/heartbeat', '-m', '{}'])).rejects.toThrow(/not authori[sz]ed|refused/i);
    } finally {
      await other.stop();
    }
  });
});
