#!/usr/bin/env bash
# Run scripts/gpu_run.sh steps in the background on the GPU machine, for sessions that talk to it through short
# remote commands (each under a time limit): start once, then poll status and collect results as they finish.
#   bash scripts/gpu_background.sh start STEP [STEP...]   # detached (setsid): survives the command that started it
#   bash scripts/gpu_background.sh status                  # one line per step: start/end time and exit status
#   bash scripts/gpu_background.sh collect DIR             # each finished step's results and logs, one .tgz per step
# A step's environment is the caller's at start, plus STEP_ENV_<step> (e.g. STEP_ENV_bench="KVDEMO_MASK_VARIANT=eager
# BENCH_ARGS='--name before'"): several runs of one step get a NAME with "name=step" (e.g. before=bench).
# Everything lives under RUNS (default /tmp/kvdemo-runs): STATUS, and NAME/ with out.txt and the step's $OUT files.
set -uo pipefail
RUNS=${RUNS:-/tmp/kvdemo-runs}
here=$(cd "$(dirname "$0")/.." && pwd)
case ${1:-} in
  start)
    shift
    [[ $# -gt 0 ]] || { echo "usage: $0 start STEP [STEP...]"; exit 2; }
    mkdir -p "$RUNS"
    setsid nohup bash "$0" run "$@" > "$RUNS/driver.log" 2>&1 < /dev/null &
    echo "started $* (pid $!); status: bash $0 status" ;;
  run)  # the detached driver: one step after another
    shift
    for spec in "$@"; do
      name=${spec%%=*}; step=${spec#*=}
      var="STEP_ENV_${name//-/_}"
      mkdir -p "$RUNS/$name"
      echo "$(date +%T) start $name ($step)" >> "$RUNS/STATUS"
      (cd "$here" && { [[ -z ${!var:-} ]] || eval "export ${!var}"; } && OUT="$RUNS/$name" bash scripts/gpu_run.sh "$step") \
        > "$RUNS/$name/out.txt" 2>&1
      echo "$(date +%T) end $name rc=$?" >> "$RUNS/STATUS"
    done
    echo "$(date +%T) DONE" >> "$RUNS/STATUS" ;;
  status)
    cat "$RUNS/STATUS" 2>/dev/null || echo "nothing started under $RUNS" ;;
  collect)
    dest=${2:?usage: $0 collect DIR}; mkdir -p "$dest"
    cp "$RUNS/STATUS" "$dest/" 2>/dev/null
    grep -oE "end [^ ]+ rc=" "$RUNS/STATUS" 2>/dev/null | cut -d' ' -f2 | while read -r name; do
      [[ -f $RUNS/$name.collected ]] && continue
      tar czf "$dest/$name.tgz" -C "$RUNS" "$name" && touch "$RUNS/$name.collected"
    done
    ls "$dest" ;;
  *)
    sed -n 2,10p "$0"; exit 2 ;;
esac
