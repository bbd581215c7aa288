import type { FastifyInstance } from 'fastify';
import { VERSION } from '../version.js';

export async function healthRoutes(api: FastifyInstance): Promise<void> {
  api.get('/health', async () => ({ status: 'ok', version: VERSION }));
}
