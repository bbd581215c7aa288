// kernexctl status — is the controller there, which version, how is the fleet.
import type { CommandModule } from 'yargs';
import { run } from './command.js';
import type { GlobalArgs } from './context.js';
import { formatAge } from './output.js';
import type { FleetSummary } from '../../schemas/index.js';
import { DEVICE_STATUSES, type Deployment } from './types.js';

export const statusCommand: CommandModule<GlobalArgs, GlobalArgs> = {
  command: 'status',
  describe: 'controller reachable? its version, devices by status, running deployments',
  builder: (y) => y.example('$0 status --json | jq .devices', 'device counts for a dashboard'),
  handler: run(async (ctx) => {
    const { out } = ctx;
    const health = await ctx.health();
    const [summary, running] = await Promise.all([
      ctx.api.get<FleetSummary>('/summary'),
      ctx.api.get<Deployment[]>('/deployments', { query: { running: 'true', limit: 1000 } }),
    ]);
    const counts: Record<string, number> = summary.devices;
    out.json({
      server: ctx.creds.server, reachable: true, version: health.version, mqtt_url: health.mqtt_url ?? null,
      devices: counts, running_deployments: running,
    });
    out.id(health.version);
    out.fields([
      ['Controller', `${ctx.creds.server}  ${out.style('reachable', 'green')}  (Kernex ${health.version})`],
      ['MQTT', health.mqtt_url ?? '-'],
      ['Devices', `${counts.total} total: ${DEVICE_STATUSES.map((s) => out.style(`${counts[s]} ${s}`, counts[s] ? out.statusStyle(s) : undefined)).join(', ')}`],
      ['Deployments', summary.deployments.running ? `${summary.deployments.running} running` : 'none running'],
    ]);
    if (running.length) {
      out.line();
      out.table<Deployment>([
        { header: 'DEPLOYMENT', value: (d) => d.deployment_id },
        { header: 'KIND', value: (d) => d.kind ?? '-' },
        { header: 'VERSION', value: (d) => d.bundle_version },
        { header: 'DONE', value: (d) => `${d.finished ?? 0}/${d.total ?? d.target_device_ids.length}` },
        { header: 'FAILED', value: (d) => String(d.failed ?? 0) },
        { header: 'STARTED', value: (d) => formatAge(d.created_at) },
      ], running);
    }
  }),
};
