#!/usr/bin/env bash
# SPDX-License-Identifier: EUPL-1.2
#
# The GPU half of `cargo xtask bench`, run from the bundle that
# `cargo xtask bench gpu-bundle` writes (target/cuda/bench-bundle/), on a Linux
# machine with an NVIDIA GPU, a Python 3.12 environment with the NVIDIA CUDA 13
# libraries (VENV, default /opt/torch/.venv), and neither Rust nor internet.
#
#   gpu.sh setup PIECES_DIR   join the mlx-cuda-13 wheel pieces found in
#                             PIECES_DIR, check them, install mlx, mlx-cuda-13
#                             and mlx-lm into /tmp/mlx-site, unpack the binary
#                             and the tokenizers
#   gpu.sh models SHAPE...    write random bf16 models (qwen3-0.6b, qwen3-1.7b,
#                             qwen3-4b, qwen3-8b, gemma3-1b) under /tmp/bench/models;
#                             SHAPE-q4 and SHAPE-q8 also quantise it with
#                             mlx_lm.convert -q (4 or 8 bits, groups of 64)
#   gpu.sh run OUT.jsonl MODEL SCENARIO-ARGS...
#                             one scenario on both engines (ours first), each
#                             appending records to OUT.jsonl (RUNS, WARMUP)
#   gpu.sh plan OUT.jsonl MODEL PLAN.json
#                             a plan (bench/plans/) in two rounds: ours then
#                             mlx-lm, then mlx-lm then ours, so that drift of
#                             the machine falls on both engines alike
#   gpu.sh train OUT.jsonl MODEL TRAIN-ARGS...
#                             LoRA training (infer-bench train and
#                             mlx_lm_train_bench.py: --batch --seq --layers
#                             --rank --report --runs [--grad-checkpoint]
#                             [--window-peaks]) in two rounds, ours first
#                             then mlx-lm first (ROUNDS=fwd: the first only)
#
#   gpu.sh http OUT.jsonl MODEL CLIENTS...
#                             serving over HTTP: our server (infer-bench serve)
#                             and mlx_lm.server on MODEL, each driven by
#                             infer-bench http-load with each CLIENTS count
#                             (REQUESTS, PROMPT_WORDS, MAX_TOKENS), ours first,
#                             then mlx-lm, then mlx-lm, then ours
#
#   gpu.sh tp OUT.jsonl MODEL RANKS PLAN.json
#                             tensor parallel over NCCL, RANKS ranks on GPUs
#                             0..RANKS-1 of this host, started with MLX's
#                             environment (MLX_RANK, MLX_WORLD_SIZE,
#                             NCCL_HOST_IP, NCCL_PORT, CUDA_VISIBLE_DEVICES):
#                             infer-bench run --tensor-parallel nccl and
#                             mlx_lm_bench.py --tensor-parallel (mlx-lm's
#                             sharded_load), ours, mlx-lm, mlx-lm, ours; rank 0
#                             writes the records (single-stream steps only)
#   gpu.sh exec COMMAND...    COMMAND with the environment above (the CUDA and
#                             MLX libraries); $WORK is /tmp/bench
#   gpu.sh trace OUT.csv COMMAND...
#                             COMMAND (as for exec) with every kernel, copy and
#                             memset it runs on the GPU recorded in OUT.csv by
#                             cupti/trace.c (built here with gcc against the
#                             environment's CUPTI on first use); read it with
#                             cupti/steps.py
#   gpu.sh ab OUT.jsonl MODEL PLAN.json VAR=A VAR=B
#                             an A/B of our engine alone under two settings of
#                             an environment variable, in the order A, B, B, A;
#                             records of each go to OUT-A.jsonl and OUT-B.jsonl
#   gpu.sh envs OUT.jsonl MODEL PLAN.json "ENGINES" SETTING...
#                             each engine of ENGINES ("ours mlx-lm", "ours")
#                             under each SETTING (`default`, or VAR=VALUE[,VAR=
#                             VALUE...]: MLX's own knobs such as
#                             MLX_USE_CUDA_GRAPHS=0), every pair once in order
#                             and once in reverse (ROUNDS=fwd or rev for one
#                             half); records go to OUT-ENGINE-SETTING.jsonl,
#                             the engine's log (RUST_LOG, mlx-lm's step
#                             profile) to OUT-ENGINE-SETTING.log (SETTING
#                             with every character but letters, digits, `_`,
#                             `.` and `-` written `_`)
#
# Raw records go through `cargo xtask bench report` back on the build machine.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
VENV=${VENV:-/opt/torch/.venv}
PY=$VENV/bin/python
SITE=/tmp/mlx-site
WORK=/tmp/bench
RUNS=${RUNS:-5}
WARMUP=${WARMUP:-1}

# The CUDA libraries of the environment and MLX's own.
libs=$SITE/mlx/lib
for d in "$VENV"/lib/python3*/site-packages/nvidia/*/lib; do libs=$libs:$d; done
export LD_LIBRARY_PATH=$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
CUDA_HOME=$(ls -d "$VENV"/lib/python3*/site-packages/nvidia/cu13 2>/dev/null | head -1 || true)
export CUDA_HOME
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}

unxz_to() { # FILE.xz DEST
    "$PY" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' "$1" "$2"
}

cmd=${1:-}
shift || true
case "$cmd" in
setup)
    pieces=$1
    wheel=$(cat "$HERE/wheel.name")
    mkdir -p "$WORK"
    if [ ! -f "$SITE/.installed" ]; then
        cat "$pieces/$wheel".part-a* >"$WORK/$wheel"
        (cd "$WORK" && sha256sum -c "$HERE/wheel.sha256")
        "$PY" -m pip install -q --no-index --no-deps --target "$SITE" \
            "$WORK/$wheel" "$HERE"/wheels/*.whl
        rm -f "$WORK/$wheel"
        touch "$SITE/.installed"
    fi
    unxz_to "$HERE/infer-bench.xz" "$WORK/infer-bench"
    chmod +x "$WORK/infer-bench"
    "$PY" -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' \
        "$HERE/tokenizers.tar.xz" "$WORK/tokenizers"
    "$PY" -c 'import mlx.core as mx, mlx_lm; print("mlx", mx.__version__, mx.default_device(), "mlx-lm", mlx_lm.__version__)'
    ;;
models)
    for name in "$@"; do
        shape=${name%-q[48]}
        case "$shape" in gemma3*) tok=gemma3 ;; *) tok=qwen3 ;; esac
        [ -f "$WORK/models/$shape/model.safetensors" ] ||
            "$WORK/infer-bench" random-model --shape "$shape" --dtype bfloat16 \
                --tokenizer "$WORK/tokenizers/$tok" --out "$WORK/models/$shape"
        if [ "$name" != "$shape" ] && [ ! -f "$WORK/models/$name/config.json" ]; then
            # mlx-community's layout, as `mlx_lm.convert -q` writes it.
            "$PY" -m mlx_lm convert --hf-path "$WORK/models/$shape" \
                --mlx-path "$WORK/models/$name" -q --q-bits "${name##*-q}" --q-group-size 64
        fi
    done
    ;;
run)
    out=$1 model=$2
    shift 2
    "$WORK/infer-bench" run --model "$WORK/models/$model" --runs "$RUNS" --warmup "$WARMUP" \
        --out "$out" "$@"
    "$PY" "$HERE/mlx_lm_bench.py" --model "$WORK/models/$model" --runs "$RUNS" \
        --warmup "$WARMUP" --out "$out" "$@"
    ;;
plan)
    out=$1 model=$2 plan=$3
    ours() { "$WORK/infer-bench" run --model "$WORK/models/$model" --plan "$plan" --out "$out"; }
    theirs() { "$PY" "$HERE/mlx_lm_bench.py" --model "$WORK/models/$model" --plan "$plan" --out "$out"; }
    ours && theirs && theirs && ours
    ;;
exec)
    exec "$@"
    ;;
trace)
    out=$1
    shift
    lib=$WORK/libinfer_trace.so
    if [ ! -f "$lib" ]; then
        incs=() cupti=
        for d in "$VENV"/lib/python3*/site-packages/nvidia/*/include /usr/local/cuda/include \
            /usr/local/cuda/extras/CUPTI/include; do
            [ -d "$d" ] && incs+=("-I$d")
        done
        for f in "$VENV"/lib/python3*/site-packages/nvidia/*/lib/libcupti.so* \
            /usr/local/cuda/extras/CUPTI/lib64/libcupti.so*; do
            [ -f "$f" ] && cupti=$f && break
        done
        [ -n "$cupti" ] || { echo "trace: no libcupti.so found" >&2; exit 1; }
        mkdir -p "$WORK"
        # The newest kernel record the headers know is the layout CUPTI writes.
        for v in 14 13 12 11 10 9 8 7 6 5; do
            gcc -O2 -shared -fPIC "${incs[@]}" -DKERNEL_RECORD="CUpti_ActivityKernel$v" \
                "$HERE/cupti/trace.c" "$cupti" -lpthread -o "$lib" 2>/dev/null && break
        done
        [ -f "$lib" ] || { echo "trace: could not build cupti/trace.c" >&2; exit 1; }
    fi
    CUDA_INJECTION64_PATH=$lib INFER_TRACE_OUT=$out "$@"
    ;;
tp)
    out=$1 model=$2 n=$3 plan=$4
    ranks() { # COMMAND...: RANKS copies with NCCL's environment; fails if one fails
        local port=$((29500 + RANDOM % 2000)) pids=() r status=0
        for r in $(seq 0 $((n - 1))); do
            MLX_RANK=$r MLX_WORLD_SIZE=$n NCCL_HOST_IP=127.0.0.1 NCCL_PORT=$port \
                CUDA_VISIBLE_DEVICES=$r "$@" &
            pids+=($!)
        done
        for r in "${pids[@]}"; do wait "$r" || status=1; done
        return $status
    }
    ours() { ranks "$WORK/infer-bench" run --model "$WORK/models/$model" --plan "$plan" \
        --out "$out" --label "$model" --tensor-parallel nccl; }
    theirs() { ranks "$PY" "$HERE/mlx_lm_bench.py" --model "$WORK/models/$model" --plan "$plan" \
        --out "$out" --label "$model" --tensor-parallel; }
    ours && theirs && theirs && ours
    ;;
ab)
    out=$1 model=$2 plan=$3 a=$4 b=$5
    variant() { env "$1" "$WORK/infer-bench" run --model "$WORK/models/$model" --plan "$plan" \
        --out "${out%.jsonl}-${1#*=}.jsonl"; }
    variant "$a" && variant "$b" && variant "$b" && variant "$a"
    ;;
envs)
    out=$1 model=$2 plan=$3 engines=$4
    shift 4
    one() { # ENGINE SETTING
        local engine=$1 setting=$2 base vars=()
        # Letters, digits, `_`, `.` and `-` only: the device tool brings back
        # no file whose name has an `=` or a `,`.
        base=${out%.jsonl}-$engine-${setting//[^A-Za-z0-9_.-]/_}
        [ "$setting" = default ] || IFS=, read -ra vars <<<"$setting"
        case $engine in
        ours) env "${vars[@]}" "$WORK/infer-bench" run --model "$WORK/models/$model" \
            --plan "$plan" --out "$base.jsonl" 2>>"$base.log" ;;
        mlx-lm) env "${vars[@]}" "$PY" "$HERE/mlx_lm_bench.py" --model "$WORK/models/$model" \
            --plan "$plan" --out "$base.jsonl" --profile 2>>"$base.log" ;;
        *) echo "unknown engine $engine" >&2; return 1 ;;
        esac
    }
    order=()
    for s in "$@"; do for e in $engines; do order+=("$e $s"); done; done
    if [ "${ROUNDS:-both}" != rev ]; then
        for item in "${order[@]}"; do one $item; done
    fi
    if [ "${ROUNDS:-both}" != fwd ]; then
        for ((i = ${#order[@]} - 1; i >= 0; i--)); do one ${order[i]}; done
    fi
    ;;
train)
    out=$1 model=$2
    shift 2
    ours() { "$WORK/infer-bench" train --model "$WORK/models/$model" --label "$model" --out "$out" "$@"; }
    theirs() { "$PY" "$HERE/mlx_lm_train_bench.py" --model "$WORK/models/$model" --label "$model" --out "$out" "$@"; }
    # ROUNDS=fwd: ours then mlx-lm only.
    ours "$@" && theirs "$@"
    if [ "${ROUNDS:-both}" != fwd ]; then theirs "$@" && ours "$@"; fi
    ;;
http)
    out=$1 model=$2
    shift 2
    port=8097
    url=http://127.0.0.1:$port
    wait_up() {
        for _ in $(seq 1500); do
            "$PY" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + "/v1/models", timeout=2)' "$url" 2>/dev/null && return 0
            sleep 0.2
        done
        return 1
    }
    engine() { # ours|mlx-lm
        if [ "$1" = ours ]; then
            "$WORK/infer-bench" serve --model "$WORK/models/$model" --port $port --parallel 64 &
            name=model
        else
            "$PY" -m mlx_lm server --model "$WORK/models/$model" --port $port --log-level WARNING &
            name=default_model
        fi
        pid=$!
        wait_up
        for c in $CLIENTS; do
            "$WORK/infer-bench" http-load --url $url --model-name $name --clients "$c" \
                --requests "${REQUESTS:-4}" --prompt-words "${PROMPT_WORDS:-64}" \
                --max-tokens "${MAX_TOKENS:-128}" --runs "${HTTP_RUNS:-2}" --engine "$1" \
                --label "$model" --out "$out"
        done
        kill $pid; wait $pid 2>/dev/null || true
    }
    CLIENTS="$*"
    # mlx_lm.server's generation thread dies at 32 clients with MLX's
    # default CUDA graph cache ("Cache thrashing is happening, please set
    # MLX_CUDA_GRAPH_CACHE_SIZE to a larger value than 400"), and its
    # /v1/models scans the Hugging Face cache: both set, for both engines.
    export MLX_CUDA_GRAPH_CACHE_SIZE=${MLX_CUDA_GRAPH_CACHE_SIZE:-4000}
    export HF_HUB_CACHE=${HF_HUB_CACHE:-$WORK/hf-cache}
    mkdir -p "$HF_HUB_CACHE"
    engine ours && engine mlx-lm && engine mlx-lm && engine ours
    ;;
*)
    sed -n '4,61p' "$0"
    exit 2
    ;;
esac
