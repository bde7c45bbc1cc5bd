#!/usr/bin/env bash
# fleetgate's bare TLS-origination relay (`fleetgate connect`) against stunnel, haproxy and nginx,
# measured with the shared yardstick (run in place, never copied here).
#
#   bench/yardstick.sh /path/to/shared/bench [scenario ...]
#
# scenarios (default: all, in this order): versions verify bulk conn resume mtls latency idle
#
# Environment:
#   PYTHON     interpreter with uvloop and psutil for the yardstick (default /tmp/perf/venv/bin/python,
#              else python3); the yardstick's README says how to make it
#   FLEETGATE  the fleetgate executable (default: this checkout's .venv/bin/fleetgate)
#   ANCHORS    comparison proxies (default haproxy,nginx,stunnel; needs the Debian packages
#              stunnel4 haproxy nginx libnginx-mod-stream, services stopped)
#   REPEAT     interleaved rounds per scenario (default 3)
#   OUT        directory for the JSON lines, one file per row (default $BENCH_WORK/fleetgate-$TAG,
#              BENCH_WORK defaulting to /tmp/perf/bench); report.py prints one table per file at the end
#   TAG        free text stored in every record (default fleetgate-<git short hash>)
#   BENCH_WORK, BENCH_PORT are passed to the yardstick unchanged.
#
# Rows: fg = full handshake per connection (--no-resume), fgr = resumption on (the anchors get
# --resume there), fgm = client certificate (--mtls). Results are recorded in docs/benchmarks.md.
set -euo pipefail

if [[ $# -lt 1 || ! -f "$1/run.py" ]]; then
    echo "usage: $0 /path/to/shared/bench [versions|verify|bulk|conn|resume|mtls|latency|idle ...]" >&2
    exit 2
fi
YARD=$(cd "$1" && pwd)
shift
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-}
if [[ -z $PYTHON ]]; then
    if [[ -x /tmp/perf/venv/bin/python ]]; then PYTHON=/tmp/perf/venv/bin/python; else PYTHON=python3; fi
fi
FLEETGATE=${FLEETGATE:-$HERE/.venv/bin/fleetgate}
ANCHORS=${ANCHORS:-haproxy,nginx,stunnel}
REPEAT=${REPEAT:-3}
WORK=${BENCH_WORK:-/tmp/perf/bench}
TAG=${TAG:-fleetgate-$(git -C "$HERE" rev-parse --short HEAD 2>/dev/null || echo unknown)}
OUT=${OUT:-$WORK/$TAG}
mkdir -p "$OUT"
SCENARIOS=("$@")
[[ ${#SCENARIOS[@]} -gt 0 ]] || SCENARIOS=(versions verify bulk conn resume mtls latency idle)

"$PYTHON" -c 'import uvloop, psutil' 2>/dev/null || {
    echo "$PYTHON lacks uvloop/psutil: python3 -m venv /tmp/perf/venv && /tmp/perf/venv/bin/pip install uvloop psutil" >&2
    exit 2
}
[[ -x $FLEETGATE ]] || { echo "no fleetgate at $FLEETGATE (set FLEETGATE)" >&2; exit 2; }

CONNECT="$FLEETGATE connect --listen {listen} --to {upstream} --cafile {ca} --server-name {sni}"
yard() {  # yard ROW run.py-arguments...
    local row=$1
    shift
    echo "+ run.py $*" >&2
    "$PYTHON" "$YARD/run.py" "$@" --out "$OUT/$row.jsonl" --tag "$TAG" \
        --cmd fg "$CONNECT --no-resume" \
        --cmd fgr "$CONNECT" \
        --cmd fgm "$CONNECT --no-resume --cert {cert} --key {key}"
}

for scenario in "${SCENARIOS[@]}"; do
    case $scenario in
        versions) yard versions versions ;;
        verify)  # must refuse an untrusted CA and a wrong name
            yard verify verify --proxy fg,fgr
            yard verify verify --mtls --proxy fgm
            if grep -q '"pass": false' "$OUT/verify.jsonl"; then
                echo "fleetgate accepted an untrusted or misnamed upstream: see $OUT/verify.jsonl" >&2
                exit 1
            fi ;;
        bulk)
            for dir in up down; do
                for conns in 1 8; do
                    yard "bulk-$dir-$conns" bulk --repeat "$REPEAT" --dir "$dir" --conns "$conns" \
                        --proxy "fg,$ANCHORS"
                done
            done ;;
        conn) yard conn conn --repeat "$REPEAT" --proxy "fg,$ANCHORS" ;;
        resume) yard conn-resume conn --resume --repeat "$REPEAT" --proxy "fgr,$ANCHORS" ;;
        mtls) yard conn-mtls conn --mtls --repeat "$REPEAT" --proxy "fgm,$ANCHORS" ;;
        latency) yard latency latency --repeat "$REPEAT" --proxy "fg,$ANCHORS" ;;
        idle) yard idle idle --repeat "$REPEAT" --levels 1000,5000 --proxy "fg,$ANCHORS" ;;
        *) echo "unknown scenario $scenario" >&2; exit 2 ;;
    esac
done
shopt -s nullglob
reports=("$OUT"/*.jsonl)
[[ ${#reports[@]} -eq 0 ]] || "$PYTHON" "$YARD/report.py" "${reports[@]}"
