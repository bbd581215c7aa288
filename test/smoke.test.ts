import { validate, SchemaError } from '../schemas/index.js';
test('schemas', () => {
  expect(validate.manifest({ version: '1.0.0', deploy: { script: 'd.sh' } })).toBe(true);
  expect(validate.manifest({ version: 'x', deploy: { script: '../d.sh' } })).toBe(false);
  expect(validate.manifest.explain().length).toBe(2);
  const c = { polling_interval: '120' };
  expect(validate.configUpdate.parse(c)).toEqual({ polling_interval: 120 });
  expect(() => validate.registerRequest.parse({ device_id: 'a/b', public_key: 'x'.repeat(20) })).toThrow(SchemaError);
});
