#!/usr/bin/env bash
# Builds the release `mediaplane` binary of a past revision into target/baseline/REV/, for
# benchmarks that compare this build with it in one run (MP_BENCH_BASELINE_BIN).
#   bash scripts/baseline.sh d447a43
set -euo pipefail
cd "$(dirname "$0")/.."
rev="${1:?usage: scripts/baseline.sh REV}"
out="target/baseline/$rev"
if [ -x "$out/mediaplane" ]; then echo "$out/mediaplane"; exit 0; fi
src="target/baseline/src-$rev"
rm -rf "$src"
mkdir -p "$src"
git archive "$rev" | tar -x -C "$src"
# A target directory of its own: the baseline's dependencies differ from this build's.
CARGO_TARGET_DIR="$PWD/target/baseline/target" cargo build --release --locked --bin mediaplane \
  --manifest-path "$src/Cargo.toml" >&2
mkdir -p "$out"
cp target/baseline/target/release/mediaplane "$out/mediaplane"
rm -rf "$src"
echo "$out/mediaplane"
