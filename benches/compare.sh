#!/usr/bin/env bash
# Measures switchyard against nginx and HAProxy with ../shared/bench/proxy-compare (same load, same
# pinning, same worker count). Usage:
#   benches/compare.sh [proxy-compare options...]      e.g. --rounds 5 --duration 5
# The harness starts switchyard through `benches/compare.sh serve ...`, which writes a proxy.toml for
# the harness's placeholders and execs the release binary (so the harness measures its PID). wrk runs
# through benches/wrk-cookie.sh, which gives the cookie variant a valid switchyard cookie.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"

if [[ "${1:-}" == "serve" ]]; then
  port=$2 backends=$3 workers=$4 mode=$5 tmpdir=$6
  case "$mode" in
    roundrobin) strategy=round_robin ;;
    iphash) strategy=ip_hash ;;
    cookie) strategy=cookie ;;
    *) echo "compare.sh: unsupported mode $mode" >&2; exit 2 ;;
  esac
  config="$tmpdir/switchyard-$mode.toml"
  {
    printf '[runtime]\nworkers = %s\n\n' "$workers"
    printf '[[listeners]]\nlisten = "127.0.0.1:%s"\n\n[[routes]]\npool = "bench"\n\n' "$port"
    printf '[pools.bench]\nstrategy = "%s"\nbackends = [\n' "$strategy"
    IFS=',' read -ra addrs <<< "$backends"
    for a in "${addrs[@]}"; do printf '  { address = "%s" },\n' "$a"; done
    printf ']\n\n[pools.bench.cookie]\nname = "sy"\nsecret = "compare-secret-0123456789"\n'
  } > "$config"
  export RUST_LOG=warn
  exec "$repo/target/release/switchyard" --config "$config"
fi

for tool in nginx haproxy wrk taskset curl; do
  command -v "$tool" >/dev/null || { echo "compare.sh: needs $tool (apt-get install -y nginx haproxy wrk curl)" >&2; exit 1; }
done
cargo build --release --manifest-path "$repo/Cargo.toml"
self="$repo/benches/compare.sh"
exec "$repo/../shared/bench/proxy-compare" \
  --wrk "$repo/benches/wrk-cookie.sh" \
  --ours-port 18095 \
  --ours "$self serve {port} {backends} {workers} roundrobin {tmpdir}" \
  --ours-hash "$self serve {port} {backends} {workers} iphash {tmpdir}" \
  --ours-cookie "$self serve {port} {backends} {workers} cookie {tmpdir}" \
  "$@"
