#!/usr/bin/env bash
# Run scripts/gpu_run.sh steps in the background on the GPU machine, for sessions that talk to it through short
# remote commands (each under a time limit): start once, then poll status and collect results as they finish.
#   bash scripts/gpu_background.sh start STEP [STEP...]   # detached (setsid): survives the command that started it
#   bash scripts/gpu_background.sh lanes "STEP STEP" "STEP" ...  # lanes at once, each its steps in order
#   bash scripts/gpu_background.sh status                  # one line per step: start/end time and exit status
#   bash scripts/gpu_background.sh wait SECONDS            # until DONE, a step's end or SECONDS; status + running tails
#   bash scripts/gpu_background.sh collect DIR             # each finished step's results and logs, one .tgz per step
# A step's environment is the caller's at start, plus STEP_ENV_<step> (e.g. STEP_ENV_bench="KVDEMO_MASK_VARIANT=eager
# BENCH_ARGS='--name before'"): several runs of one step get a NAME with "name=step" (e.g. before=bench).
# WAIT_FOR_<name>="FILE..." holds a step until those files exist (inputs still being carried in, a model another
# lane converts); after WAIT_MAX seconds (default 1800) the step is skipped. COLLECT_MAX caps the archives per
# collect (a remote command may bring back only a few files).
# Everything lives under RUNS (default /tmp/kvdemo-runs): STATUS, and NAME/ with out.txt and the step's $OUT files.
set -uo pipefail
RUNS=${RUNS:-/tmp/kvdemo-runs}
here=$(cd "$(dirname "$0")/.." && pwd)
note() { echo "$(date +%T) $*" >> "$RUNS/STATUS"; }
inputs_ready() {  # $1 name: every file in WAIT_FOR_<name> exists, waiting up to WAIT_MAX seconds
  local var="WAIT_FOR_${1//-/_}" deadline=$((SECONDS + ${WAIT_MAX:-1800})) f
  for f in ${!var:-}; do
    while [[ ! -e $f ]]; do
      if ((SECONDS >= deadline)); then note "skip $1: no $f after ${WAIT_MAX:-1800} s"; return 1; fi
      sleep 1
    done
  done
}
finished() {  # how many steps ended or were skipped so far (0 before the first STATUS line)
  cat "$RUNS/STATUS" 2>/dev/null | grep -c " end \| skip "
}
run_steps() {  # spec... (name=step or step), one after another
  local spec name step var
  for spec in "$@"; do
    name=${spec%%=*}; step=${spec#*=}
    var="STEP_ENV_${name//-/_}"
    inputs_ready "$name" || continue
    mkdir -p "$RUNS/$name"
    note "start $name ($step)"
    (cd "$here" && { [[ -z ${!var:-} ]] || eval "export ${!var}"; } && OUT="$RUNS/$name" bash scripts/gpu_run.sh "$step") \
      > "$RUNS/$name/out.txt" 2>&1
    note "end $name rc=$?"
  done
}
detach() {  # mode args...: the driver, in a session of its own
  mkdir -p "$RUNS"
  setsid nohup bash "$0" "$@" > "$RUNS/driver.log" 2>&1 < /dev/null &
  echo "started ${*:2} (pid $!); status: bash $0 status"
}
case ${1:-} in
  start)
    shift
    [[ $# -gt 0 ]] || { echo "usage: $0 start STEP [STEP...]"; exit 2; }
    detach run "$@" ;;
  lanes)
    shift
    [[ $# -gt 0 ]] || { echo "usage: $0 lanes \"STEP STEP\" \"STEP\" ..."; exit 2; }
    detach run-lanes "$@" ;;
  run)  # the detached driver: one step after another
    shift; run_steps "$@"; note DONE ;;
  run-lanes)  # the detached driver: each argument a lane of steps, all lanes at once
    shift
    for lane in "$@"; do
      read -ra specs <<< "$lane"
      run_steps "${specs[@]}" &
    done
    wait; note DONE ;;
  status)
    cat "$RUNS/STATUS" 2>/dev/null || echo "nothing started under $RUNS" ;;
  wait)
    limit=${2:?usage: $0 wait SECONDS}; ends=$(finished)
    for ((i = 0; i < limit; i++)); do
      grep -q " DONE$" "$RUNS/STATUS" 2>/dev/null && break
      (($(finished) > ends)) && break
      sleep 1
    done
    cat "$RUNS/STATUS" 2>/dev/null
    grep -oE "start [^ ]+" "$RUNS/STATUS" 2>/dev/null | cut -d' ' -f2 | while read -r name; do
      grep -q " end $name rc=" "$RUNS/STATUS" && continue
      echo "== $name (running)"; grep -v " INFO " "$RUNS/$name/out.txt" 2>/dev/null | tail -"${TAIL:-5}" | cut -c1-300
    done ;;
  collect)
    dest=${2:?usage: $0 collect DIR}; mkdir -p "$dest"
    cp "$RUNS/STATUS" "$dest/" 2>/dev/null
    left=${COLLECT_MAX:-1000}
    while read -r name; do
      [[ -f $RUNS/$name.collected ]] && continue
      ((left > 0)) || break
      tar czf "$dest/$name.tgz" -C "$RUNS" "$name" && touch "$RUNS/$name.collected" && left=$((left - 1))
    done < <(grep -oE "end [^ ]+ rc=" "$RUNS/STATUS" 2>/dev/null | cut -d' ' -f2)
    ls "$dest" ;;
  *)
    sed -n 2,15p "$0"; exit 2 ;;
esac
