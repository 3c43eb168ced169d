#!/usr/bin/env bash
# SPDX-License-Identifier: EUPL-1.2
#
# One device call's worth of `gpu.sh` steps, run from the repository root on
# the GPU machine, each step only while the call's time lasts, everything
# under $OUT/r and brought back as one tarball ($OUT/r.tgz: the device tool
# returns only a few files a call). The first call of a cold machine carries
# the wheel's first piece only (`pieces-a`); the next, at once, the bundle and
# the second piece (docs/building.md says why).
#
#   bash bench/gpu-session.sh LIMIT_S STEP...
#
#   pieces-a           copy the wheel's first piece to /tmp/mlx-wheel
#   setup              copy the second piece and run `gpu.sh setup` (skipped
#                      when an earlier call on this machine did it)
#   models:SHAPE,...   `gpu.sh models` (random bf16 models, -q4/-q8 forms)
#   check:DTYPE[:VAR=VALUE,...]
#                      `infer-bench fused-check --dtype DTYPE` under those
#                      settings, records to check-DTYPE[-VAR=VALUE...].jsonl, failing cases
#                      to the log
#   plan:MODEL:PLAN[:VAR=VALUE,...]
#                      `gpu.sh plan` beside mlx-lm under those settings
#                      (INFER_* ones change only our engine), PLAN a file of
#                      bench/plans/ without `.json`, records to
#                      PLAN-MODEL.jsonl (-VAR=VALUE-... added where settings
#                      are given; at most 170 s a step)
#   envs:MODEL:PLAN:SETTING/SETTING...
#                      `gpu.sh envs` of our engine alone under each SETTING
#                      (`default` or VAR=VALUE,...), then
#                      bench/pick_setting.py's table and choice in the log
#   (a step's settings `@pick`: the setting the last `envs` step on this
#   machine chose, none where it chose `default`)
#   trace:MODEL:PROMPT:DECODE:ENGINE[:VAR=VALUE,...]
#                      `gpu.sh trace` of one warm-up and one run of ENGINE
#                      (`ours` or `mlx-lm`) under those settings, the kernel
#                      list gzipped to trace-ENGINE-MODEL-PROMPT-DECODE.csv.gz
#                      (-VAR=VALUE-... added where settings are given) and
#                      bench/cupti/steps.py's summary beside it (.txt, .json;
#                      at most 120 s a step, 40 s kept for the summary)
#
# LIMIT_S is the call's time limit less the transfers (575 for a 600 s call);
# a step that would start with less than 80 s left is skipped.
set -uo pipefail

limit=$1
shift
root=$(pwd)
bundle=$root/target/cuda/bench-bundle
pieces=$root/target/cuda/bundle-wheel
gpu="bash $bundle/gpu.sh"
work=/tmp/bench
py=${VENV:-/opt/torch/.venv}/bin/python
out=$OUT/r
mkdir -p "$out"
t0=$(date +%s)
left() { echo $((limit - ($(date +%s) - t0))); }
say() { echo "== $(($(date +%s) - t0)) s: $*" | tee -a "$out/log.txt"; }
# A `timeout` that ends gpu.sh leaves its Python child running; the bracket
# keeps the pattern from matching the command line that runs it.
leftovers() {
    pkill -x infer-bench
    pkill -f "[m]lx_lm_"
    true
}

# The host's load and its busiest processes, to the log before a timed step:
# a slow or busy host slows mlx-lm's step more than ours (2026-12-07 evening).
host_state() {
    { uptime; ps -eo pcpu=,comm= --sort=-pcpu | head -4; } 2>/dev/null | sed 's/^/   host: /' \
        >>"$out/log.txt"
}

# The settings `$1` names as VAR=VALUE words in `vars` (`@pick`: the last
# `envs` step's choice) and as a file name's tail in `tag`.
use_settings() {
    local s=$1 picked=
    if [ "$s" = @pick ]; then
        s=$(cat "$work/pick.txt" 2>/dev/null) picked=1
        [ -n "$s" ] || say "no envs choice on this machine: @pick runs with no settings"
    fi
    [ "$s" = default ] && s=
    vars=() tag=
    # A pick of no settings still gets a name of its own.
    [ -n "$picked" ] && [ -z "$s" ] && tag=-default
    if [ -n "$s" ]; then
        IFS=, read -ra vars <<<"$s"
        tag=-${s//,/-}
    fi
}

for step in "$@"; do
    IFS=: read -r kind a b c <<<"$step"
    if [ "$kind" != pieces-a ] && [ "$(left)" -lt 80 ]; then
        say "skipped $step: $(left) s left"
        continue
    fi
    case $kind in
    pieces-a)
        mkdir -p /tmp/mlx-wheel && cp "$pieces"/*.part-aa /tmp/mlx-wheel/
        ;;
    setup)
        if [ ! -x "$work/infer-bench" ]; then
            cp "$pieces"/*.part-ab /tmp/mlx-wheel/
            say setup
            $gpu setup /tmp/mlx-wheel >>"$out/log.txt" 2>&1 || { say "setup failed"; break; }
        fi
        nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv \
            >>"$out/log.txt"
        { nproc; grep -m1 'model name' /proc/cpuinfo; } >>"$out/log.txt" 2>&1
        ;;
    models)
        say "models $a"
        $gpu models ${a//,/ } >>"$out/log.txt" 2>&1
        ;;
    check)
        use_settings "$b"
        say "check $a ${vars[*]}"
        env "${vars[@]}" timeout $(($(left) - 5)) $gpu exec "$work/infer-bench" fused-check \
            --dtype "$a" >"$out/check-$a$tag.jsonl" 2>>"$out/log.txt"
        say "check exit $?"
        leftovers
        "$py" -c '
import json, sys
bad = 0
for line in open(sys.argv[1]):
    if line.startswith("{"):
        r = json.loads(line)
        d = r["max_abs_diff"]
        if d is None or d != d or d > r["bound"]:
            bad += 1
            print("FAIL", line.strip())
print("failing cases:", bad)' "$out/check-$a$tag.jsonl" >>"$out/log.txt" 2>&1
        ;;
    plan)
        n=$(($(left) - 5))
        [ "$n" -gt 170 ] && n=170
        use_settings "$c"
        name=$b-$a$tag
        say "plan $a $b ${vars[*]} ($n s at most)"
        host_state
        env "${vars[@]}" timeout "$n" $gpu plan "$out/$name.jsonl" "$a" "$root/bench/plans/$b.json" \
            >>"$out/log.txt" 2>&1
        leftovers
        ;;
    envs)
        IFS=/ read -ra settings <<<"$c"
        rm -f "$work/pick.txt"
        say "envs $a $b ${settings[*]}"
        host_state
        timeout $(($(left) - 5)) $gpu envs "$out/envs-$b-$a.jsonl" "$a" "$root/bench/plans/$b.json" \
            ours "${settings[@]}" >>"$out/log.txt" 2>&1
        leftovers
        "$py" "$root/bench/pick_setting.py" "$out/envs-$b-$a.jsonl" "${settings[@]}" \
            2>>"$out/log.txt" | tail -1 >"$work/pick.txt"
        say "envs chose $(cat "$work/pick.txt")"
        ;;
    trace)
        IFS=: read -r _ a b c engine chosen <<<"$step"
        use_settings "$chosen"
        name=trace-$engine-$a-$b-$c$tag
        case $engine in
        ours) run=("$work/infer-bench" run) ;;
        mlx-lm) run=("$py" "$bundle/mlx_lm_bench.py") ;;
        *)
            say "unknown engine in $step"
            continue
            ;;
        esac
        n=$(($(left) - 40))
        [ "$n" -gt 120 ] && n=120
        say "trace $engine $a $b/$c ${vars[*]} ($n s at most)"
        env "${vars[@]}" timeout "$n" $gpu trace "$out/$name.csv" "${run[@]}" --model "$work/models/$a" \
            --scenario single --prompt "$b" --decode "$c" --runs 1 --warmup 1 \
            --out "$out/$name.jsonl" >>"$out/log.txt" 2>&1
        say "trace exit $?"
        leftovers
        if [ -s "$out/$name.csv" ]; then
            timeout 30 "$py" "$root/bench/cupti/steps.py" "$out/$name.csv" --top 40 --sequence 60 \
                --json "$out/$name-steps.json" >"$out/$name-steps.txt" 2>&1
            head -12 "$out/$name-steps.txt" >>"$out/log.txt"
            gzip -f "$out/$name.csv"
        else
            say "no trace written"
        fi
        ;;
    *)
        say "unknown step $step"
        ;;
    esac
done
say done
grep -v '^{\|^(warm\|^\[mlx-lm' "$out/log.txt" | tail -40
tar czf "$OUT/r.tgz" -C "$OUT" r
