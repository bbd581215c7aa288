// kernexctl bundles pack | sign | upload | list | get
import { createHash } from 'node:crypto';
import { createReadStream } from 'node:fs';
import { lstat, mkdtemp, readdir, readFile, readlink, realpath, rename, rm, stat } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { basename, dirname, join, relative, resolve, sep } from 'node:path';
import type { Argv, CommandModule } from 'yargs';
import type { BundleManifest } from '../../schemas/index.js';
import { run } from './command.js';
import type { Context, GlobalArgs } from './context.js';
import { CtlError, EXIT, usageError } from './errors.js';
import { dash, formatAge, formatBytes, progressBar } from './output.js';
import type { Bundle } from './types.js';

// Never packed: version control and editor litter.
const SKIP = new Set(['.git', '.hg', '.svn', '.DS_Store']);

export interface PackResult {
  file: string;
  name: string | null;
  version: string;
  size: number;
  sha256: string;
  files: number;
}

const inside = (root: string, p: string) => p === root || p.startsWith(root + sep);

/** Relative to the current directory when below it, else absolute. */
const shortPath = (p: string) => {
  const rel = relative(process.cwd(), p);
  return rel && !rel.startsWith('..') ? rel : p;
};

/** Reads and validates `<dir>/manifest.json`; every problem is a usage error naming the fix. */
export async function readManifest(dir: string): Promise<BundleManifest> {
  const { validate, SchemaError } = await import('../../schemas/index.js');
  const file = join(dir, 'manifest.json');
  let raw: string;
  try {
    raw = await readFile(file, 'utf8');
  } catch {
    throw usageError(`${dir} has no manifest.json: a bundle needs one with at least "version" and "deploy": {"script": ...}`);
  }
  let data: unknown;
  try {
    data = JSON.parse(raw);
  } catch (err) {
    throw usageError(`${file} is not valid JSON (${(err as Error).message}); fix it and run again`);
  }
  try {
    return validate.manifest.parse(data);
  } catch (err) {
    if (err instanceof SchemaError) throw usageError(`${file} is invalid: ${err.details.join('; ')}; fix it and run again`);
    throw err;
  }
}

/** The scripts the manifest names must be regular files inside the bundle directory. */
async function checkScripts(root: string, manifest: BundleManifest): Promise<void> {
  const steps: Array<[string, string | undefined]> = [['deploy', manifest.deploy.script], ['rollback', manifest.rollback?.script]];
  for (const [step, script] of steps) {
    if (!script) continue;
    const path = resolve(root, script);
    let real: string;
    try {
      real = await realpath(path);
    } catch {
      throw usageError(`manifest.json names ${step} script '${script}', but ${path} does not exist; add it or fix the path`);
    }
    if (!inside(root, real)) throw usageError(`${step} script '${script}' resolves outside the bundle directory (${real})`);
    if (!(await stat(real)).isFile()) throw usageError(`${step} script '${script}' is not a regular file`);
  }
}

/** Every path to pack, relative to root; refuses what the agent would refuse to extract. */
async function collect(root: string, exclude: string, earlierArchive: RegExp): Promise<string[]> {
  const paths: string[] = [];
  const walk = async (dir: string) => {
    for (const entry of await readdir(dir, { withFileTypes: true })) {
      if (SKIP.has(entry.name)) continue;
      const abs = join(dir, entry.name);
      // Neither the archive being written nor one packed earlier by `pack` in the same place.
      if (abs === exclude || (dir === root && earlierArchive.test(entry.name))) continue;
      const rel = relative(root, abs);
      if (entry.isSymbolicLink()) {
        const target = resolve(dirname(abs), await readlink(abs));
        if (!inside(root, target)) {
          throw usageError(`${rel} is a symlink to ${target}, outside the bundle; the agent refuses such bundles: copy the file in instead`);
        }
        paths.push(rel);
      } else if (entry.isDirectory()) {
        paths.push(rel);
        await walk(abs);
      } else if (entry.isFile()) {
        paths.push(rel);
      } else {
        throw usageError(`${rel} is not a regular file, directory or symlink (a socket or device?); remove it from the bundle`);
      }
    }
  };
  await walk(root);
  return paths;
}

async function sha256File(file: string): Promise<string> {
  const hash = createHash('sha256');
  for await (const chunk of createReadStream(file)) hash.update(chunk as Buffer);
  return hash.digest('hex');
}

export async function packBundle(dir: string, output?: string): Promise<PackResult> {
  let root: string;
  try {
    root = await realpath(dir);
    if (!(await stat(root)).isDirectory()) throw new Error('not a directory');
  } catch {
    throw usageError(`${dir} is not a directory; give the directory that holds manifest.json`);
  }
  const manifest = await readManifest(root);
  await checkScripts(root, manifest);
  const name = (manifest.name ?? basename(root)).replace(/[^\w.-]+/g, '_');
  const file = resolve(output ?? `${name}-${manifest.version}.tar.gz`);
  const escaped = name.replace(/[.]/g, '\\.');
  const paths = await collect(root, file, new RegExp(`^${escaped}-.+\\.tar\\.gz(\\.\\d+\\.tmp)?$`));
  // Directories are listed for their modes; tar must not add their contents twice.
  const tar = await import('tar');
  const tmp = `${file}.${process.pid}.tmp`;
  try {
    await tar.c({ gzip: true, file: tmp, cwd: root, portable: true, noDirRecurse: true }, paths);
    await rename(tmp, file);
  } catch (err) {
    await rm(tmp, { force: true });
    throw new CtlError(`could not write ${file}: ${(err as Error).message}`, EXIT.failed, { cause: err });
  }
  const { size } = await stat(file);
  return {
    file, name: manifest.name ?? null, version: manifest.version, size, sha256: await sha256File(file),
    files: (await Promise.all(paths.map((p) => lstat(join(root, p))))).filter((s) => !s.isDirectory()).length,
  };
}

const pack: CommandModule<GlobalArgs, GlobalArgs & { dir: string; output?: string }> = {
  command: 'pack <dir>',
  describe: 'check a bundle directory (manifest.json against the schema, scripts present) and write a .tar.gz',
  builder: (y) => y
    .positional('dir', { type: 'string', demandOption: true, describe: 'directory with manifest.json and the scripts' })
    .option('output', { alias: 'o', type: 'string', describe: 'archive to write [default: <name>-<version>.tar.gz here]' })
    .example('$0 bundles pack ./my-app', 'writes my-app-1.2.0.tar.gz')
    .example('$0 bundles pack ./my-app -o /tmp/app.tgz', 'choose the file name')
    .epilogue('Skipped: .git, .hg, .svn, .DS_Store, and <name>-*.tar.gz archives an earlier pack left in the directory.'),
  handler: run(async (ctx, argv) => {
    const result = await packBundle(argv.dir, argv.output);
    ctx.out.json(result);
    ctx.out.id(result.file);
    ctx.out.line(`Packed ${result.name ?? 'bundle'} ${result.version} → ${shortPath(result.file)} ` +
      `(${result.files} files, ${formatBytes(result.size)}, sha256 ${result.sha256.slice(0, 12)}…)`);
  }),
};

/** Reads a PEM private key file for signing; a usage error names the fix. */
async function readSigningKey(path: string): Promise<string> {
  let pem: string;
  try {
    pem = await readFile(path, 'utf8');
  } catch {
    throw usageError(`cannot read the signing key ${path}; make one with: openssl genpkey -algorithm ed25519 -out ${path}`);
  }
  if (!/-----BEGIN (ENCRYPTED )?PRIVATE KEY-----/.test(pem)) throw usageError(`${path} is not a PEM private key (PKCS#8)`);
  return pem;
}

/** Signs an archive with an Ed25519 key: the signature line the agent's --trusted-keys check accepts. */
export async function signArchive(file: string, keyFile: string): Promise<{ sha256: string; signature: string; key_id: string }> {
  const { signBundleFile, parseSignature } = await import('../../agent/bundle/index.js');
  const key = await readSigningKey(keyFile);
  let signed;
  try {
    signed = await signBundleFile(file, key);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') throw usageError(`${file} does not exist; give the .tar.gz to sign`);
    throw usageError(`cannot sign with ${keyFile}: ${(err as Error).message}`);
  }
  return { ...signed, key_id: parseSignature(signed.signature).keyId };
}

/** A signature given to upload: the line itself, or a .sig file holding it. */
async function signatureArg(value: string): Promise<string> {
  const { SIGNATURE_PATTERN } = await import('../../agent/bundle/index.js');
  if (SIGNATURE_PATTERN.test(value.trim())) return value.trim();
  let text: string;
  try {
    text = (await readFile(value, 'utf8')).trim();
  } catch {
    throw usageError(`--signature ${value} is neither a signature line nor a readable .sig file`);
  }
  if (!SIGNATURE_PATTERN.test(text)) throw usageError(`${value} does not hold a signature (ed25519:<key id>:<base64>); make one with kernexctl bundles sign`);
  return text;
}

const sign: CommandModule<GlobalArgs, GlobalArgs & { file: string; key: string; output?: string }> = {
  command: 'sign <file>',
  describe: 'sign a bundle archive with an Ed25519 key (agents started with --trusted-keys run only signed bundles)',
  builder: (y) => y
    .positional('file', { type: 'string', demandOption: true, describe: 'the .tar.gz to sign' })
    .option('key', { alias: 'k', type: 'string', demandOption: true, describe: 'Ed25519 private key (PEM); keep it off the controller' })
    .option('output', { alias: 'o', type: 'string', describe: 'signature file to write [default: <file>.sig]' })
    .example('openssl genpkey -algorithm ed25519 -out release.pem', 'make a signing key once')
    .example('openssl pkey -in release.pem -pubout -out release.pub', 'the public key the agents trust')
    .example('$0 bundles sign my-app-1.2.0.tar.gz --key release.pem', 'writes my-app-1.2.0.tar.gz.sig')
    .example('$0 bundles upload my-app-1.2.0.tar.gz --signature my-app-1.2.0.tar.gz.sig', 'upload it signed'),
  handler: run(async (ctx, argv) => {
    const signed = await signArchive(resolve(argv.file), argv.key);
    const out = resolve(argv.output ?? `${argv.file}.sig`);
    const { writeFile } = await import('node:fs/promises');
    await writeFile(out, `${signed.signature}\n`);
    ctx.out.json({ file: resolve(argv.file), signature_file: out, ...signed });
    ctx.out.id(out);
    ctx.out.line(`Signed ${shortPath(resolve(argv.file))} (sha256 ${signed.sha256.slice(0, 12)}…) with key ${signed.key_id} → ${shortPath(out)}`);
  }),
};

/** Uploads a file (or packs a directory first), with a progress bar on a terminal. */
export async function uploadBundle(ctx: Context, path: string, signing: { signature?: string; signKey?: string } = {}): Promise<Bundle> {
  let file = resolve(path);
  let temp: string | null = null;
  let st;
  try {
    st = await stat(file);
  } catch {
    throw usageError(`${path} does not exist; give a .tar.gz or a bundle directory`);
  }
  if (st.isDirectory()) {
    temp = await mkdtemp(join(tmpdir(), 'kernexctl-'));
    const packed = await packBundle(file, join(temp, 'bundle.tar.gz'));
    ctx.out.notice(`Packed ${path} (${packed.name ?? 'bundle'} ${packed.version}, ${formatBytes(packed.size)})`);
    file = packed.file;
  }
  const name = temp ? `${basename(resolve(path))}.tar.gz` : basename(file);
  let signature = signing.signature ? await signatureArg(signing.signature) : undefined;
  if (signing.signKey) signature = (await signArchive(file, signing.signKey)).signature;
  const live = ctx.out.liveLine();
  const started = Date.now();
  try {
    const bundle = await ctx.api.upload(file, name, live ? (sent, total) => {
      const secs = Math.max(0.001, (Date.now() - started) / 1000);
      live.set(`Uploading ${name} ${progressBar(sent, total)} ${formatBytes(sent)}/${formatBytes(total)} ` +
        `${formatBytes(Math.round(sent / secs))}/s`, sent === total);
    } : undefined, signature);
    live?.done();
    return bundle;
  } catch (err) {
    live?.clear();
    throw err;
  } finally {
    if (temp) await rm(temp, { recursive: true, force: true });
  }
}

const upload: CommandModule<GlobalArgs, GlobalArgs & { path: string; signature?: string; signKey?: string }> = {
  command: 'upload <path>',
  describe: 'upload a bundle (.tar.gz, or a directory: packed first)',
  builder: (y) => y
    .positional('path', { type: 'string', demandOption: true, describe: 'bundle archive or directory' })
    .option('signature', { type: 'string', describe: 'its signature: a .sig file from `bundles sign`, or the line itself' })
    .option('sign-key', { type: 'string', describe: 'sign while uploading with this Ed25519 private key (PEM)' })
    .conflicts('signature', 'sign-key')
    .example('$0 bundles upload my-app-1.2.0.tar.gz', 'upload an archive')
    .example('$0 bundles upload ./my-app', 'pack and upload in one go')
    .example('ID=$($0 bundles upload ./my-app -q)', 'keep the new bundle id'),
  handler: run(async (ctx, argv) => {
    const bundle = await uploadBundle(ctx, argv.path, { signature: argv.signature, signKey: argv.signKey });
    ctx.out.json(bundle);
    ctx.out.id(bundle.id);
    ctx.out.line(`Uploaded ${bundle.name ?? 'bundle'} ${bundle.version} as ${bundle.id} ` +
      `(${formatBytes(bundle.size)}, sha256 ${bundle.sha256.slice(0, 12)}…)`);
    ctx.out.line(`Deploy it with: kernexctl deploy ${bundle.version} --devices <ids> --wait`);
  }),
};

const list: CommandModule<GlobalArgs, GlobalArgs> = {
  command: ['list', 'ls'],
  describe: 'list uploaded bundles, newest version first',
  handler: run(async (ctx) => {
    const bundles = await ctx.api.get<Bundle[]>('/bundles');
    ctx.out.json(bundles);
    for (const b of bundles) ctx.out.id(b.id);
    if (!bundles.length) {
      ctx.out.line('No bundles yet: kernexctl bundles upload <dir|file>');
      return;
    }
    ctx.out.table<Bundle>([
      { header: 'VERSION', value: (b) => b.version },
      { header: 'NAME', value: (b) => dash(b.name) },
      { header: 'SIZE', value: (b) => formatBytes(b.size) },
      { header: 'SHA256', value: (b) => `${b.sha256.slice(0, 12)}…` },
      { header: 'UPLOADED', value: (b) => formatAge(b.created_at) },
      { header: 'ID', value: (b) => b.id },
    ], bundles);
  }),
};

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;
export const looksLikeBundleId = (ref: string) => UUID.test(ref);

export async function findBundle(ctx: Context, ref: string): Promise<Bundle> {
  if (looksLikeBundleId(ref)) {
    return ctx.api.get<Bundle>(`/bundles/${encodeURIComponent(ref)}/info`, {
      notFound: () => `bundle ${ref} not found: \`kernexctl bundles list\` shows the uploaded bundles`,
    });
  }
  const found = (await ctx.api.get<Bundle[]>('/bundles')).find((b) => b.version === ref);
  if (!found) throw usageError(`no bundle with version ${ref}: \`kernexctl bundles list\` shows the uploaded bundles`);
  return found;
}

const get: CommandModule<GlobalArgs, GlobalArgs & { bundle: string }> = {
  command: 'get <bundle>',
  describe: 'show one bundle, by version or id',
  builder: (y) => y.positional('bundle', { type: 'string', demandOption: true, describe: 'bundle version or id' }),
  handler: run(async (ctx, argv) => {
    const b = await findBundle(ctx, argv.bundle);
    ctx.out.json(b);
    ctx.out.id(b.id);
    const manifest = (b.manifest ?? {}) as Partial<BundleManifest>;
    ctx.out.fields([
      ['Bundle', b.id],
      ['Name', dash(b.name)],
      ['Version', b.version],
      ['Size', `${formatBytes(b.size)} (${b.size} bytes)`],
      ['SHA256', b.sha256],
      ['File', dash(b.filename)],
      ['Deploy script', dash(manifest.deploy?.script)],
      ['Rollback script', manifest.rollback?.script ?? '(deploy script)'],
      ['Signature', dash(b.signature)],
      ['Uploaded', dash(b.created_at)],
    ]);
  }),
};

export const bundlesCommand: CommandModule<GlobalArgs, GlobalArgs> = {
  command: ['bundles', 'bundle'],
  describe: 'bundles: pack a directory, sign, upload, list, inspect',
  builder: (y: Argv<GlobalArgs>) => y
    .command(pack)
    .command(sign)
    .command(upload)
    .command(list)
    .command(get)
    .demandCommand(1, 'name a bundles command: pack, sign, upload, list or get'),
  handler: () => {},
};
