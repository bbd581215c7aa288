// Generates schemas/types.ts from the *.schema.json files, so the TypeScript
// types are derived from the schemas and cannot drift from them. Run by
// `npm run build`; test/schemas.test.ts fails when the committed file is stale.
import { compileFromFile } from 'json-schema-to-typescript';
import { readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

const dir = dirname(fileURLToPath(import.meta.url));

export async function generateTypes() {
  const files = readdirSync(dir).filter((f) => f.endsWith('.schema.json')).sort();
  const parts = ['// Generated from schemas/*.schema.json by schemas/generate-types.mjs. Do not edit.\n'];
  const seen = new Set();
  for (const file of files) {
    const ts = await compileFromFile(join(dir, file), {
      cwd: dir,
      bannerComment: '',
      additionalProperties: false,
      declareExternallyReferenced: true,
      unreachableDefinitions: false,
      format: true,
      ignoreMinAndMaxItems: true,
    });
    // Referenced definitions are emitted by every schema that uses them: keep the first.
    for (const block of ts.split(/\n(?=export )/)) {
      const name = /^export (?:interface|type) (\w+)/.exec(block.trim())?.[1];
      if (name && seen.has(name)) continue;
      if (name) seen.add(name);
      parts.push(block.trim() + '\n');
    }
  }
  return parts.join('\n');
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const out = join(dir, 'types.ts');
  const next = await generateTypes();
  if (readFileSync(out, { flag: 'a+' }).toString() !== next) writeFileSync(out, next);
}
