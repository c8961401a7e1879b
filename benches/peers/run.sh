#!/usr/bin/env bash
# BullMQ and pg-boss on this machine, for comparison with `cargo bench --bench jobs`
# run in the same hour. Needs Node.js/npm, Redis on 127.0.0.1:6379 and Postgres on
# 127.0.0.1:5432 (user postgres); uses a scratch database and Redis keys of its own.
set -euo pipefail
cd "$(dirname "$0")"
# Not `npm ci`: npm 11 leaves some optional platform packages of msgpackr out of the
# lock file it writes, and then refuses it as out of sync. `install` keeps the lock's versions.
[ -d node_modules ] || npm install --no-audit --no-fund --loglevel=error
db="peer_bench_$$"
psql -h 127.0.0.1 -U postgres -qc "CREATE DATABASE $db"
trap 'psql -h 127.0.0.1 -U postgres -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)"' EXIT
export PEER_DATABASE_URL="postgres://postgres@127.0.0.1:5432/$db"
node peers.mjs bull-e2e 64 50 20000
node peers.mjs bull-e2e 256 50 20000
# Steady state (start-up weighs on 20,000 jobs); compare MP_BENCH_TOTAL=100000.
node peers.mjs bull-e2e 256 50 100000
node peers.mjs bull-full 50 100000
# pg-boss sorts every queued job on each fetch: its rate depends on the queue's depth.
node peers.mjs boss-full 16 50 10000
node peers.mjs boss-full 16 50 100000
