#!/usr/bin/env bash
# fieldsync beside today's peer servers, in one run, on this machine (see bench/README.md).
#   bench/run.sh                  # the reported figures: REPS=3, fieldsync + ywss-mem + hocus-sqlite
#   bench/run.sh --smoke          # ~2 min: tiny sizes, 1 rep, checks the whole chain
#   REPS=1 PEERS="fieldsync hocus-sqlite" SCENARIOS="s2 s3" bench/run.sh
#   CPROFILE=1 PEERS=fieldsync SCENARIOS=s2 REPS=1 bench/run.sh   # + cProfile of the server
#   FIELDSYNC_REF=HEAD bench/run.sh   # measure a commit (git archive) instead of the work tree
#   FIELDSYNC_PATCH=bench/patches/settle-pending-author.patch bench/run.sh   # measure with a fix
# The load generator for every server is the peer bench's ysync_load.py (y-websocket protocol;
# fieldsync is reached at /v1/yws/wo:{doc}?token=...); fieldsync's own protocol is driven by
# bench/v1_load.py in the same run (S2 and S3 over fieldsync.v1).
# Everything listens on and talks to 127.0.0.1 only; each load run is bounded by --timeout.
set -uo pipefail
CALLER_DIR=$(pwd)
cd "$(dirname "$0")"
BENCH=$(pwd)
ROOT=$(dirname "$BENCH")
SMOKE=0; [[ "${1:-}" == "--smoke" ]] && SMOKE=1
REPS=${REPS:-3}; [[ $SMOKE == 1 ]] && REPS=1
PEERS=${PEERS:-"fieldsync ywss-mem hocus-sqlite"}
SCENARIOS=${SCENARIOS:-"s1 s2 s3 s4"}
V1=${V1:-1}                       # also run the fieldsync.v1 scenarios (S2-v1, S3-v1)
PORT=${PORT:-12345}
TIMEOUT=${TIMEOUT:-120}; [[ $SMOKE == 1 ]] && TIMEOUT=30
S3_TIMEOUT=${S3_TIMEOUT:-300}; [[ $SMOKE == 1 ]] && S3_TIMEOUT=30  # S3's preload of 5,000 docs
PEER_BENCH=${PEER_BENCH:-/tmp/peer-bench}   # a writable copy of shared/peer-bench
DATA=${DATA:-/tmp/fieldsync-bench}          # server data dirs and logs (not in the repo)
PY="$ROOT/.venv/bin/python"                 # fieldsync's venv: bench/serve.py, bench/v1_load.py
if [[ $SMOKE == 1 ]]; then OUT=${OUT:-/tmp/fieldsync-bench-smoke.jsonl}; rm -f "$OUT"
else OUT=${OUT:-$BENCH/results/runs.jsonl}; fi
[[ $OUT == /* ]] || OUT="$CALLER_DIR/$OUT"
if [[ $OUT == "$BENCH/results/runs.jsonl" ]]; then SUMMARY="$BENCH/results/RESULTS.md"
else SUMMARY="${OUT%.jsonl}.md"; fi  # the table goes beside its results
RUN_ID=${RUN_ID:-$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$BENCH/results" "$DATA"

# ---------------------------------------------------------------- install (peer bench copy)
if [[ ! -f "$PEER_BENCH/ysync_load.py" ]]; then
  SRC=${PEER_BENCH_SRC:-$ROOT/../shared/peer-bench}
  cp -r "$SRC" "$PEER_BENCH" && chmod -R u+w "$PEER_BENCH"
  rm -f "$PEER_BENCH/results/runs.jsonl"
fi
[[ -x "$PY" ]] || { echo "no $PY: run 'make test' or create the venv first" >&2; exit 2; }
(
  cd "$PEER_BENCH" || exit 1
  [[ -x .venv/bin/python ]] || python3 -m venv .venv
  .venv/bin/python -c "import pycrdt, aiohttp, zstandard, uvloop" 2>/dev/null \
    || .venv/bin/pip install -q -r requirements.txt
  if [[ ! -d node_modules/@hocuspocus/server || ! -d node_modules/@y/websocket-server ]]; then
    NODEDIR=$(dirname "$(dirname "$(readlink -f "$(command -v node)")")")
    [[ -d "$NODEDIR/include/node" ]] && export npm_config_nodedir="$NODEDIR"
    npm ci --no-audit --no-fund || npm install --no-audit --no-fund
  fi
) || { echo "peer bench install failed" >&2; exit 2; }
LOAD="$PEER_BENCH/.venv/bin/python $PEER_BENCH/ysync_load.py"

# ---------------------------------------------------------------- the fieldsync code measured
# One run measures one version: a snapshot of fieldsync/ and openapi/ (the contract the package
# links to) taken now (the work tree, or the commit FIELDSYNC_REF via `git archive`, which
# changes nothing in the repo) is put first on PYTHONPATH, so edits made in the repo during the
# run do not leak into it.
SRC_DIR="$DATA/src"; rm -rf "$SRC_DIR"; mkdir -p "$SRC_DIR"
COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
if [[ -n "${FIELDSYNC_REF:-}" ]]; then
  git -C "$ROOT" archive "$FIELDSYNC_REF" fieldsync openapi | tar -x -C "$SRC_DIR" || exit 2
  CODE=$(git -C "$ROOT" rev-parse --short "$FIELDSYNC_REF")
else
  cp -r "$ROOT/fieldsync" "$ROOT/openapi" "$SRC_DIR/"
  CODE=$COMMIT; [[ -n $(git -C "$ROOT" status --porcelain -- fieldsync openapi 2>/dev/null) ]] && CODE="$COMMIT+worktree"
fi
for patch in ${FIELDSYNC_PATCH:-}; do  # optional fixes to measure (bench/patches/*.patch)
  [[ $patch == /* ]] || patch="$CALLER_DIR/$patch"
  patch -s -p1 -d "$SRC_DIR" < "$patch" || { echo "patch $patch does not apply" >&2; exit 2; }
  CODE="$CODE+$(basename "$patch" .patch)"
done
export PYTHONPATH="$SRC_DIR${PYTHONPATH:+:$PYTHONPATH}"
echo "== measuring fieldsync $CODE (from $SRC_DIR)" >&2

# ---------------------------------------------------------------- sizes (as run_peers.sh)
if [[ $SMOKE == 1 ]]; then
  S1="--docs 10 --clients 3 --updates 10 --pace-ms 50"; S2="--n 1000"; S2N=1000
  S3="--docs 20 --history 50"; S4="--docs 20 --n 100 --hold 1"
else
  S1=${S1:-"--docs 100 --clients 4 --updates 50 --pace-ms 200"}
  S2=${S2:-"--n 10000"}; S2N=${S2N:-10000}
  # S3: a supervisor's device, 5,000 work orders (issue 13; was 200 docs x 100 updates)
  S3=${S3:-"--docs 5000 --history 20 --cold-concurrency 10"}
  S4=${S4:-"--docs 200 --n 2000 --hold 5"}
fi

# ---------------------------------------------------------------- servers
SERVER_PID=""; TOKEN=""
start_peer() {  # $1 = peer, $2 = keep (reuse its data dir), $3 = profile name; starts on $PORT
  local peer=$1 data="$DATA/$1"
  [[ "${2:-}" == keep ]] || { rm -rf "$data"; mkdir -p "$data"; }
  if [[ $peer == fieldsync ]]; then
    local prof=()
    if [[ -n "${CPROFILE:-}" && -n "${3:-}" ]]; then
      mkdir -p "$DATA/profiles"; prof=(--cprofile "$DATA/profiles/$3.prof")
    fi
    rm -f "$data/serve.json"
    "$PY" "$BENCH/serve.py" --data-dir "$data" --port "$PORT" "${prof[@]}" \
      > "$data/serve.json" 2>> "$data/server.log" &
    SERVER_PID=$!
    for _ in $(seq 100); do
      kill -0 "$SERVER_PID" 2>/dev/null || break
      if [[ -s "$data/serve.json" ]]; then
        TOKEN=$("$PY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["token"])' "$data/serve.json")
        return 0
      fi
      sleep 0.1
    done
  else
    local cmd
    case $peer in
      ywss-mem)      cmd=(env HOST=127.0.0.1 PORT=$PORT node node_modules/@y/websocket-server/src/server.js) ;;
      ywss-leveldb)  cmd=(env HOST=127.0.0.1 PORT=$PORT YPERSISTENCE="$data/leveldb" node node_modules/@y/websocket-server/src/server.js) ;;
      hocus-sqlite)  cmd=(env PORT=$PORT DB="$data/hocuspocus.sqlite" node servers/hocuspocus_server.mjs) ;;
      pycrdt-sqlite) cmd=(env PORT=$PORT STORE=sqlite DB="$data/ystore.db" .venv/bin/python servers/pycrdt_server.py) ;;
      pycrdt-mem)    cmd=(env PORT=$PORT STORE=memory .venv/bin/python servers/pycrdt_server.py) ;;
      *) echo "unknown peer $peer" >&2; return 1 ;;
    esac
    (cd "$PEER_BENCH" && exec "${cmd[@]}") >> "$data/server.log" 2>&1 &
    SERVER_PID=$!
    for _ in $(seq 100); do
      kill -0 "$SERVER_PID" 2>/dev/null || break
      (echo > /dev/tcp/127.0.0.1/$PORT) 2>/dev/null && return 0
      sleep 0.1
    done
  fi
  echo "peer $peer did not start; see $data/server.log" >&2; stop_peer; return 1
}
stop_peer() {
  [[ -n "$SERVER_PID" ]] || return 0
  kill "$SERVER_PID" 2>/dev/null
  for _ in $(seq 100); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$SERVER_PID" 2>/dev/null; wait "$SERVER_PID" 2>/dev/null; SERVER_PID=""
}
trap stop_peer EXIT

url() {  # the y-websocket URL template of a peer
  if [[ $1 == fieldsync ]]; then echo "ws://127.0.0.1:$PORT/v1/yws/wo:{doc}?token=$TOKEN"
  else echo "ws://127.0.0.1:$PORT/{doc}"; fi
}
proto() { [[ $1 == hocus-* ]] && echo hocuspocus || echo y; }

# Each result line gets the run id and the rep, so ratios pair figures measured side by side.
record() {  # $1 = rep; reads one JSON line per result on stdin, appends to $OUT
  "$PY" -c '
import json, sys
run, rep, out, code = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
for line in sys.stdin:
    line = line.strip()
    if line.startswith("{"):
        r = json.loads(line); r["run"] = run; r["rep"] = rep
        if r["label"].startswith("fieldsync"): r["code"] = code
        r["loadavg_1m"] = float(open("/proc/loadavg").read().split()[0])  # others on the machine
        with open(out, "a") as f: f.write(json.dumps(r) + "\n")
        print(json.dumps({k: r.get(k) for k in ("label", "scenario", "converged", "wall_s",
              "ack_s", "lat_p99_ms", "server_cpu_s", "bytes_received", "rss_per_conn_bytes")}))
' "$RUN_ID" "$1" "$OUT" "$CODE"
}

ysync() {  # $1 = peer, $2 = scenario, rest = extra flags
  local peer=$1 sc=$2; shift 2
  local sizes_var=${sc^^} limit=$TIMEOUT
  [[ $sc == s3 ]] && limit=$S3_TIMEOUT
  timeout $((limit + 130)) $LOAD --url "$(url "$peer")" --protocol "$(proto "$peer")" --scenario "$sc" ${!sizes_var} \
    --server-pid "$SERVER_PID" --label "$peer" --timeout "$limit" "$@"
}
v1() {  # $1 = label, rest = v1_load flags
  local label=$1; shift
  timeout $((S3_TIMEOUT + 130)) "$PY" "$BENCH/v1_load.py" --url "ws://127.0.0.1:$PORT/v1/sync" --token "$TOKEN" \
    --server-pid "$SERVER_PID" --label "$label" --timeout "$TIMEOUT" "$@"
}
log_errors() { grep -iE "error|exception|traceback" "$DATA/$1/server.log" 2>/dev/null | grep -v CancelledError | sort | uniq -c | head -3 >&2; }

# ---------------------------------------------------------------- runs (peers interleaved per rep)
T0=$(date +%s)
STATE="$DATA/s3_state.json"
for rep in $(seq "$REPS"); do
  for sc in $SCENARIOS; do
    for peer in $PEERS; do
      echo "== rep $rep  $sc  $peer" >&2
      start_peer "$peer" "" "$sc-$peer-r$rep" || continue
      if [[ $sc == s3 && $peer != *-mem ]]; then
        # durable servers: preload, restart on the same data, then cold-sync from disk
        ysync "$peer" s3 --phase preload --state-file "$STATE" > /dev/null
        stop_peer; start_peer "$peer" keep "$sc-$peer-cold-r$rep" || continue
        ysync "$peer" s3 --phase cold --state-file "$STATE" | record "$rep"
        if [[ $peer == fieldsync && $V1 == 1 ]]; then
          # a fresh device over fieldsync.v1, each from a freshly restarted server (from disk)
          stop_peer; start_peer "$peer" keep "s3v1-r$rep" || continue
          v1 fieldsync-v1 --scenario s3 --state-file "$STATE" --caps zstd,batch | record "$rep"
          stop_peer; start_peer "$peer" keep "s3v1plain-r$rep" || continue
          v1 fieldsync-v1-plain --scenario s3 --state-file "$STATE" --caps "" | record "$rep"
        fi
      else
        ysync "$peer" "$sc" | record "$rep"
      fi
      stop_peer
      log_errors "$peer"
      if [[ $sc == s2 && $peer == fieldsync && $V1 == 1 ]]; then
        start_peer fieldsync "" "s2v1-r$rep" && v1 fieldsync-v1 --scenario s2 --n "$S2N" | record "$rep"
        stop_peer
        start_peer fieldsync "" "s2v1batch-r$rep" && v1 fieldsync-v1-batch64 --scenario s2 --n "$S2N" --batch 64 | record "$rep"
        stop_peer
        log_errors fieldsync
      fi
      sleep 1
    done
  done
done
echo "== run $RUN_ID done in $(( $(date +%s) - T0 )) s" >&2

# ---------------------------------------------------------------- summary
"$PY" "$BENCH/summarize.py" --runs "$OUT" --run "$RUN_ID" --out "$SUMMARY" > /dev/null
echo "== results: $OUT, table: $SUMMARY" >&2
cat "$SUMMARY"
