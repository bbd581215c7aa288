// Real bundles: a manifest and scripts packed into a .tar.gz with `tar`.
import { mkdtemp, mkdir, writeFile, readFile, chmod } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import * as tar from 'tar';

export interface BundleSpec {
  manifest: Record<string, unknown> | string;
  files: Record<string, string>;
}

/** A bundle whose deploy script appends `<version>` to $KERNEX_TEST_OUT and exits with `exit`. */
export function scriptBundle(version: string, out: string, opts: { exit?: number; rollback?: boolean } = {}): BundleSpec {
  const files: Record<string, string> = {
    'deploy.sh': `#!/bin/sh\necho "deploying ${version}"\necho "deploy ${version}" >> "${out}"\nexit ${opts.exit ?? 0}\n`,
    'payload/app.txt': `app ${version}\n`,
  };
  const manifest: Record<string, unknown> = { name: 'demo-app', version, deploy: { script: 'deploy.sh' } };
  if (opts.rollback) {
    files['rollback.sh'] = `#!/bin/sh\necho "rollback ${version}" >> "${out}"\n`;
    manifest.rollback = { script: 'rollback.sh' };
  }
  return { manifest, files };
}

export async function packBundle(spec: BundleSpec): Promise<Buffer> {
  const dir = await mkdtemp(join(tmpdir(), 'kernex-bundle-'));
  const names = ['manifest.json'];
  await writeFile(join(dir, 'manifest.json'), typeof spec.manifest === 'string' ? spec.manifest : JSON.stringify(spec.manifest));
  for (const [name, content] of Object.entries(spec.files)) {
    await mkdir(dirname(join(dir, name)), { recursive: true });
    await writeFile(join(dir, name), content);
    if (name.endsWith('.sh')) await chmod(join(dir, name), 0o755);
    names.push(name);
  }
  const out = join(dir, '..', `${dir.split('/').pop()}.tar.gz`);
  await tar.c({ gzip: true, file: out, cwd: dir, portable: true }, names);
  return readFile(out);
}

/** A bundle with one extra entry stored under `hostilePath` (e.g. '../x'), kept verbatim. */
export async function packWithEntry(spec: BundleSpec, hostilePath: string): Promise<Buffer> {
  const base = await mkdtemp(join(tmpdir(), 'kernex-hostile-'));
  const dir = join(base, 'a', 'b');
  await mkdir(dir, { recursive: true });
  await writeFile(join(dir, 'manifest.json'), JSON.stringify(spec.manifest));
  const names = ['manifest.json'];
  for (const [name, content] of Object.entries(spec.files)) {
    await mkdir(dirname(join(dir, name)), { recursive: true });
    await writeFile(join(dir, name), content);
    names.push(name);
  }
  await mkdir(dirname(join(dir, hostilePath)), { recursive: true });
  await writeFile(join(dir, hostilePath), 'owned\n');
  names.push(hostilePath);
  const out = join(base, 'bundle.tar.gz');
  await tar.c({ gzip: true, file: out, cwd: dir, portable: true, preservePaths: true }, names);
  return readFile(out);
}
