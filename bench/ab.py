#!/usr/bin/env python3
"""Two builds of `infer-bench` side by side: is a change faster, slower or the same?

Runs the plan with each binary in turn for several rounds, alternating which
goes first (so that drift of the machine affects both alike), appends the raw
records (labelled `base` and `new`) to --out, and prints, per plan step, the
median of each figure for both builds, the ratio new / base, and whether the
greedy ids of every run are the same.

    python3 bench/ab.py --base /tmp/infer-bench-base --new target/release/infer-bench \
        --model .cache/bench/models/smollm2-135m-q4 --plan bench/plans/quick.json --rounds 4

Build the base from an earlier commit with `git worktree add /tmp/base REV` and
`cargo build --release -p infer-bench` there (`MLX_C_SRC`, `MLX_PREFIX` and
`CARGO_TARGET_DIR` pointing at this checkout's), then copy the binary away
before building the new one into the same target directory.
"""

import argparse
import json
import statistics
import subprocess
import sys
from collections import defaultdict

FIGURES = ["ttft_s", "prefill_tps", "decode_tps", "batch_tps", "reuse_ttft_s", "fresh_ttft_s"]
STEP_KEYS = ["scenario", "prompt", "decode", "batch", "history", "reply", "new"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", required=True, help="the earlier infer-bench binary")
    ap.add_argument("--new", required=True, help="the changed infer-bench binary")
    ap.add_argument("--model", required=True)
    ap.add_argument("--plan", required=True)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--out", required=True, help="raw records are appended here")
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")

    start = 0
    try:
        with open(args.out) as f:
            start = sum(1 for _ in f)
    except FileNotFoundError:
        pass
    for r in range(args.rounds):
        order = [("base", args.base), ("new", args.new)]
        if r % 2:
            order.reverse()
        for label, binary in order:
            cmd = [binary, "run", "--model", args.model, "--plan", args.plan,
                   "--label", label, "--out", args.out]
            print(f"ab: round {r + 1}/{args.rounds}: {label}", file=sys.stderr)
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    with open(args.out) as f:
        records = [json.loads(line) for line in f.readlines()[start:]]
    by_step = defaultdict(lambda: defaultdict(list))
    for rec in records:
        step = tuple((k, rec[k]) for k in STEP_KEYS if k in rec)
        by_step[step][rec["label"]].append(rec)

    same_everywhere = True
    for step, runs in by_step.items():
        name = " ".join(f"{k}={v}" for k, v in step)
        ids = {tuple(rec.get("first_ids", [])) for label in runs for rec in runs[label]}
        same = len(ids) <= 1
        same_everywhere &= same
        print(f"{name}: {len(runs['base'])} base runs, {len(runs['new'])} new runs, "
              f"greedy ids {'identical' if same else 'DIFFER'}")
        for fig in FIGURES:
            b = [rec[fig] for rec in runs["base"] if fig in rec]
            n = [rec[fig] for rec in runs["new"] if fig in rec]
            if not b or not n:
                continue
            mb, mn = statistics.median(b), statistics.median(n)
            spread = (max(b) - min(b)) / mb if mb else 0.0
            print(f"  {fig:>13}: base {mb:10.4f}  new {mn:10.4f}  new/base {mn / mb:6.3f}"
                  f"  (base spread {spread:.1%})")
    return 0 if same_everywhere else 1


if __name__ == "__main__":
    sys.exit(main())
