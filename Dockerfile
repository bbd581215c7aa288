# Kernex: one image for the controller (`server`, the default) and the agent (`agent`).
#
# Stage 1 builds the TypeScript with every dependency; stage 2 keeps only the
# compiled code and the production dependencies, and runs as the unprivileged
# `node` user (uid 1000) of the official image.

FROM node:20-bookworm-slim AS build
WORKDIR /src
COPY package.json package-lock.json ./
# `npm install` honours the lock file; `npm ci` trips over optional platform
# packages missing from it (an npm bug, see .ci/run).
RUN npm install --no-audit --no-fund
COPY tsconfig.json ./
COPY schemas ./schemas
COPY broker ./broker
COPY controller ./controller
COPY agent ./agent
COPY cli ./cli
RUN npm run build && npm prune --omit=dev --no-audit --no-fund

FROM node:20-bookworm-slim
ENV NODE_ENV=production \
    KERNEX_DATA_DIR=/data \
    KERNEX_AGENT_DATA_DIR=/data/agent
WORKDIR /app
COPY --from=build --chown=root:root /src/package.json ./
COPY --from=build --chown=root:root /src/node_modules ./node_modules
COPY --from=build --chown=root:root /src/dist ./dist
RUN mkdir -p /data && chown node:node /data
USER node
VOLUME ["/data"]
# REST API and MQTT.
EXPOSE 8000 1883
HEALTHCHECK --interval=15s --timeout=3s --start-period=20s \
  CMD ["node", "-e", "fetch('http://127.0.0.1:' + (process.env.KERNEX_HTTP_PORT || 8000) + '/api/v1/health').then(r => process.exit(r.ok ? 0 : 1), () => process.exit(1))"]
ENTRYPOINT ["node", "dist/cli/kernex.js"]
CMD ["server"]
