// Test certificates made with the openssl CLI: a CA, a server certificate it
// signs for 127.0.0.1/localhost, and an unrelated CA a client may wrongly trust.
import { execFile } from 'node:child_process';
import { mkdtemp, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';

const openssl = (args: string[], cwd: string) => promisify(execFile)('openssl', args, { cwd });

export interface TestCerts {
  dir: string;
  ca: string;
  cert: string;
  key: string;
  otherCa: string;
}

async function selfSignedCa(dir: string, name: string): Promise<void> {
  await openssl(['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes',
    '-keyout', `${name}.key`, '-out', `${name}.pem`, '-days', '2', '-subj', `/CN=${name}`], dir);
}

export async function makeTestCerts(): Promise<TestCerts> {
  const dir = await mkdtemp(join(tmpdir(), 'kernex-tls-'));
  await selfSignedCa(dir, 'kernex-test-ca');
  await selfSignedCa(dir, 'someone-elses-ca');
  await openssl(['req', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes',
    '-keyout', 'server.key', '-out', 'server.csr', '-subj', '/CN=localhost'], dir);
  await writeFile(join(dir, 'ext.cnf'), 'subjectAltName=IP:127.0.0.1,DNS:localhost\n');
  await openssl(['x509', '-req', '-in', 'server.csr', '-CA', 'kernex-test-ca.pem', '-CAkey', 'kernex-test-ca.key',
    '-CAcreateserial', '-out', 'server.pem', '-days', '2', '-extfile', 'ext.cnf'], dir);
  return {
    dir, ca: join(dir, 'kernex-test-ca.pem'), cert: join(dir, 'server.pem'), key: join(dir, 'server.key'),
    otherCa: join(dir, 'someone-elses-ca.pem'),
  };
}
