// Signed bundles end to end: the publisher signs, the upload carries the
// signature, the command carries it, and an agent configured with trusted
// keys runs only what a trusted key signed, refusing the rest before
// extraction.
import { existsSync } from 'node:fs';
import { mkdtemp, mkdir, readFile, writeFile } from 'node:fs/promises';
import { createHash } from 'node:crypto';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import {
  generateSigningKey, signBundleDigest, verifyBundleSignature, loadTrustedKeys, BundleSignatureError, keyId,
} from '../agent/bundle/index.js';
import { createPublicKey } from 'node:crypto';
import { startTestController, waitFor, type TestController } from './support/controller.js';
import { startAgentProcess, type AgentProcess } from './support/agent.js';
import { packBundle, scriptBundle } from './support/bundles.js';
import { kernexctl } from './support/kernexctl.js';

const sha256 = (b: Buffer) => createHash('sha256').update(b).digest('hex');

describe('signature library', () => {
  const publisher = generateSigningKey();
  const digest = sha256(Buffer.from('bundle bytes'));
  const trusted = [{ id: publisher.keyId, key: createPublicKey(publisher.publicKeyPem), source: 'test' }];

  test('a signature verifies against its key and digest only', () => {
    const signature = signBundleDigest(digest, publisher.privateKeyPem);
    expect(signature).toMatch(new RegExp(`^ed25519:${publisher.keyId}:`));
    expect(verifyBundleSignature(digest, signature, trusted)).toBe(publisher.keyId);
    expect(() => verifyBundleSignature(sha256(Buffer.from('other bytes')), signature, trusted)).toThrow(/does not match/);
    const other = generateSigningKey();
    expect(() => verifyBundleSignature(digest, signBundleDigest(digest, other.privateKeyPem), trusted)).toThrow(/does not trust/);
    expect(() => verifyBundleSignature(digest, undefined, trusted)).toThrow(BundleSignatureError);
    expect(() => verifyBundleSignature(digest, 'ed25519:zz:abc', trusted)).toThrow(/malformed/);
    // Same key id, flipped signature bytes.
    const [, id, b64] = signature.split(':') as [string, string, string];
    const bytes = Buffer.from(b64, 'base64');
    bytes[0]! ^= 1;
    expect(() => verifyBundleSignature(digest, `ed25519:${id}:${bytes.toString('base64')}`, trusted)).toThrow(/does not match/);
  });

  test('trusted keys load from files and directories; a source without a key is an error, not "trust nothing"', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'kernex-keys-'));
    const second = generateSigningKey();
    await writeFile(join(dir, 'a.pem'), publisher.publicKeyPem + second.publicKeyPem);
    const keys = await loadTrustedKeys([dir]);
    expect(keys.map((k) => k.id).sort()).toEqual([publisher.keyId, second.keyId].sort());
    expect(keyId(keys[0]!.key)).toBe(keys[0]!.id);
    await mkdir(join(dir, 'empty'));
    await expect(loadTrustedKeys([join(dir, 'empty')])).rejects.toThrow(/no PEM public key/);
    await expect(loadTrustedKeys([join(dir, 'missing.pem')])).rejects.toThrow(/ENOENT/);
  });
});

describe('an agent with trusted keys', () => {
  let tc: TestController;
  let agent: AgentProcess;
  let work: string;
  const publisher = generateSigningKey();
  const stranger = generateSigningKey();

  beforeAll(async () => {
    tc = await startTestController();
    work = await mkdtemp(join(tmpdir(), 'kernex-signing-'));
    await writeFile(join(work, 'publisher.pub'), publisher.publicKeyPem);
    agent = await startAgentProcess({
      deviceId: 'signed-dev', server: tc.controller.httpUrl, enrollmentToken: tc.creds.enrollment_token,
      extraArgs: ['--trusted-keys', join(work, 'publisher.pub')],
    });
    await waitFor(async () => (await tc.api.get('/devices/signed-dev')).body.status === 'online', 'agent online')
      .catch((err: Error) => {
        throw new Error(`${err.message}\n${agent.output()}`);
      });
  });
  afterAll(async () => {
    await agent?.stop();
    await tc?.stop();
  });

  async function uploadAndDeploy(version: string, sign: (bytes: Buffer) => string | undefined) {
    const out = join(work, `${version}.out`);
    const bytes = await packBundle(scriptBundle(version, out));
    const form = new FormData();
    const signature = sign(bytes);
    // The signature as a form field before the file (the header works as well).
    if (signature) form.append('signature', signature);
    form.append('file', new Blob([bytes]), `${version}.tar.gz`);
    const up = await tc.api.request('POST', '/bundles', form);
    expect(up.status).toBe(201);
    expect(up.body.signature ?? null).toBe(signature ?? null);
    const created = await tc.api.post('/deployments', { bundle_version: version, target_device_ids: ['signed-dev'] });
    const id = created.body.deployment_id as string;
    const dep = await waitFor(async () => {
      const d = (await tc.api.get(`/deployments/${id}`)).body;
      return d.finished_at ? d : null;
    }, `deployment of ${version}`, 30_000);
    return { dep, out, root: join(agent.dataDir, 'bundles', version, 'root') };
  }

  test('a bundle signed by the trusted key runs', async () => {
    const { dep, out } = await uploadAndDeploy('1.0.0', (b) => signBundleDigest(sha256(b), publisher.privateKeyPem));
    expect(dep.status).toBe('success');
    expect(await readFile(out, 'utf8')).toBe('deploy 1.0.0\n');
    expect(agent.output()).toContain('bundle signature verified');
  });

  test.each([
    ['unsigned', () => undefined, /not signed/],
    ['signed by a key the device does not trust', (b: Buffer) => signBundleDigest(sha256(b), stranger.privateKeyPem), /does not trust/],
    ['signed by the trusted key, but over other bytes', () => signBundleDigest(sha256(Buffer.from('another bundle')), publisher.privateKeyPem), /does not match/],
  ] as const)('a bundle %s is refused before extraction and nothing runs', async (_name, sign, why) => {
    const version = `2.0.${Math.floor(Math.random() * 1e6)}`;
    const { dep, out, root } = await uploadAndDeploy(version, sign);
    expect(dep.status).toBe('failed');
    expect(dep.devices[0]).toMatchObject({ status: 'failed', error_message: expect.stringMatching(why) });
    expect(existsSync(out)).toBe(false);
    expect(existsSync(root)).toBe(false);
    // The device still runs what it ran.
    expect((await tc.api.get('/devices/signed-dev')).body.current_bundle_version).toBe('1.0.0');
  });

  test('kernexctl bundles sign writes the .sig that upload --signature sends; the agent runs the bundle', async () => {
    const key = join(work, 'release.pem');
    await writeFile(key, publisher.privateKeyPem, { mode: 0o600 });
    const archive = join(work, 'app-3.0.0.tar.gz');
    const out = join(work, '3.0.0.out');
    await writeFile(archive, await packBundle(scriptBundle('3.0.0', out)));
    const env = { KERNEX_SERVER: tc.controller.httpUrl, KERNEX_TOKEN: tc.creds.token };
    const signed = await kernexctl(['bundles', 'sign', archive, '--key', key, '--json'], { env });
    expect(signed.code).toBe(0);
    expect(JSON.parse(signed.stdout)).toMatchObject({ key_id: publisher.keyId, signature_file: `${archive}.sig` });
    expect((await readFile(`${archive}.sig`, 'utf8')).trim()).toMatch(new RegExp(`^ed25519:${publisher.keyId}:`));
    const up = await kernexctl(['bundles', 'upload', archive, '--signature', `${archive}.sig`, '--json'], { env });
    expect(up.code).toBe(0);
    expect(JSON.parse(up.stdout).signature).toMatch(/^ed25519:/);
    const created = await tc.api.post('/deployments', { bundle_version: '3.0.0', target_device_ids: ['signed-dev'] });
    const dep = await waitFor(async () => {
      const d = (await tc.api.get(`/deployments/${created.body.deployment_id}`)).body;
      return d.finished_at ? d : null;
    }, 'the signed deployment', 30_000);
    expect(dep.status).toBe('success');
    expect(await readFile(out, 'utf8')).toBe('deploy 3.0.0\n');
    // A key that is not a key is a usage error naming the fix.
    const bad = await kernexctl(['bundles', 'sign', archive, '--key', archive], { env });
    expect(bad.code).not.toBe(0);
    expect(bad.stderr).toMatch(/not a PEM private key/);
  });
});
