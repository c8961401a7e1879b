#!/usr/bin/env bash
# Runs every check: proto lint, schema drift, formatting, clippy, unit and integration
# tests (Rust, and the Python grpcio interop client). Installs or starts what is
# missing: Postgres/Redis (if installed but stopped), the Python venv, buf, diesel CLI.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

say() { printf '\n== %s\n' "$*"; }

# --- services -----------------------------------------------------------------------
say "Postgres and Redis on localhost"
if ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
  if command -v pg_ctlcluster >/dev/null; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start
  fi
  for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
fi
pg_isready -h 127.0.0.1 -p 5432 || { echo "Postgres is not reachable on 127.0.0.1:5432 (docker compose up -d postgres)"; exit 1; }
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  if command -v redis-server >/dev/null; then
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
  fi
  for _ in $(seq 1 30); do redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1 && break; sleep 1; done
fi
redis-cli -h 127.0.0.1 -p 6379 ping || { echo "Redis is not reachable on 127.0.0.1:6379 (docker compose up -d redis)"; exit 1; }

# --- tools --------------------------------------------------------------------------
say "Python interop tools (.venv)"
if ! .venv/bin/python -c 'import grpc, grpc_tools, grpc_health, moto, openapi_spec_validator, prometheus_client, kubernetes_validate, yaml, opentelemetry.proto' 2>/dev/null; then
  python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check -r tests/interop/requirements.txt
fi

say "A strict S3-compatible server for direct-upload tests (s3s-fs)"
# moto (above) accepts any signature, expiry and checksum; s3s-fs checks them as S3 does.
if [ ! -x "${CARGO_HOME:-$HOME/.cargo}/bin/s3s-fs" ]; then
  cargo install s3s-fs --version 0.14.1 --features binary --locked
fi

say "buf lint"
BUF="$ROOT/target/tools/node_modules/.bin/buf"
if [ ! -x "$BUF" ]; then
  mkdir -p target/tools
  npm install --silent --no-audit --no-fund --prefix target/tools @bufbuild/buf@1.75.0
fi
"$BUF" lint
echo "proto lint clean"

say "Browser test tools (Chromium, playwright-core, a TypeScript client generated from proto/)"
if [ ! -x /usr/bin/chromium ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null \
    || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; }
fi
if [ ! -d tests/browser/node_modules/playwright-core ]; then
  (cd tests/browser && npm ci --silent --no-audit --no-fund)
fi
(cd tests/browser && rm -rf gen && "$BUF" generate)
echo "chromium $(/usr/bin/chromium --version 2>/dev/null | awk '{print $2}'), client generated"

say "schema.rs matches the migrations (diesel print-schema)"
if ! command -v diesel >/dev/null; then
  cargo install diesel_cli --version 2.3.14 --no-default-features --features postgres --locked
fi
SCRATCH="mp_schema_check_$$"
SCRATCH_URL="postgres://postgres@127.0.0.1:5432/$SCRATCH"
cleanup() { psql -q -h 127.0.0.1 -U postgres -d postgres -c "DROP DATABASE IF EXISTS $SCRATCH WITH (FORCE)" >/dev/null 2>&1 || true; }
trap cleanup EXIT
psql -q -h 127.0.0.1 -U postgres -d postgres -c "CREATE DATABASE $SCRATCH"
diesel migration run --locked-schema --database-url "$SCRATCH_URL" >/dev/null
diesel print-schema --database-url "$SCRATCH_URL" > "target/schema.generated.rs"
if ! diff -u src/db/schema.rs target/schema.generated.rs; then
  echo "src/db/schema.rs drifted from migrations/: run 'diesel print-schema > src/db/schema.rs'"
  exit 1
fi
# Revert and re-apply as two commands: `redo --all` runs everything in one transaction,
# where a new enum value (job_state's `waiting`) cannot be used by the next migration.
# A config without print_schema keeps diesel from rewriting schema.rs in between.
printf '[migrations_directory]\ndir = "%s/migrations"\n' "$PWD" > target/diesel-check.toml
diesel migration revert --all --config-file target/diesel-check.toml --database-url "$SCRATCH_URL" >/dev/null
diesel migration run --config-file target/diesel-check.toml --database-url "$SCRATCH_URL" >/dev/null
echo "schema.rs up to date; every migration reverts and re-applies"
cleanup

# --- Rust ---------------------------------------------------------------------------
say "cargo fmt --check"
cargo fmt --all -- --check

say "cargo clippy"
cargo clippy --all-targets --locked -- -D warnings

say "cargo test (unit and integration)"
cargo test --locked --lib --bins --tests -- --test-threads "${MEDIAPLANE_TEST_THREADS:-4}"
