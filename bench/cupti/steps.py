# SPDX-License-Identifier: EUPL-1.2
"""Where a decode step's GPU time goes, from a trace of `libinfer_trace.so`.

    python3 steps.py TRACE.csv[.gz] [--marker arg_reduce] [--top 25] [--json OUT]

The trace (see trace.c) lists every kernel, copy and memset of one process.
A step is the stretch from the end of one kernel whose name holds MARKER (the
arg-max that ends each greedy step, in both engines) to the end of the next.
For the steps whose kernel count is within 2 % (or 2) of the most common one
(decode steps; a prefill's step holds other kernels), it reports per step, as means (which add up: wall = busy + short gaps + long
gaps), and the median wall:

- wall: the step's length on the GPU's clock;
- busy: the time some kernel, copy or memset was running;
- short gaps: idle stretches under GAP_US between two pieces of work (the
  GPU's own cost of starting the next kernel of a CUDA graph);
- long gaps: idle stretches of GAP_US or more (the GPU waiting for the host
  to submit work);

and the kernels by their mean time per step; with --sequence N, the first N
pieces of work of a step in order, each with its median time (the JSON
record holds them all). Names are demangled with
`c++filt` where it exists and cut at the first template or argument list.
"""

import argparse
import collections
import gzip
import json
import shutil
import statistics
import subprocess
import sys

GAP_US = 10.0


def read(path):
    opener = gzip.open if path.endswith(".gz") else open
    rows = []
    with opener(path, "rt", errors="replace") as f:
        for line in f:
            parts = line.rstrip("\n").split(",", 4)
            if len(parts) != 5:
                continue
            kind, start, end, _graph, name = parts
            try:
                rows.append((int(start), int(end), kind, name))
            except ValueError:
                continue
    rows.sort()
    return rows


def short_names(names):
    """Mangled name -> demangled name cut before its template arguments."""
    names = sorted(set(names))
    demangled = names
    if shutil.which("c++filt"):
        out = subprocess.run(
            ["c++filt"], input="\n".join(names), capture_output=True, text=True
        ).stdout.split("\n")
        if len(out) >= len(names):
            demangled = out[: len(names)]
    result = {}
    for mangled, full in zip(names, demangled):
        cut = len(full)
        for mark in "<(":
            i = full.find(mark)
            if i > 0:
                cut = min(cut, i)
        result[mangled] = full[:cut].removeprefix("void ").strip()
    return result


def busy_and_gaps(items, lo, hi):
    """Busy time, short-gap time and long-gap time of sorted intervals in (lo, hi]."""
    busy = 0
    gaps = [0, 0]  # short, long
    cursor = lo
    for start, end in items + [(hi, hi)]:
        start = max(start, lo)
        end = min(end, hi)
        if start > cursor:
            gaps[start - cursor >= GAP_US * 1000] += start - cursor
            cursor = start
        if end > cursor:
            busy += end - cursor
            cursor = end
    return busy, gaps[0], gaps[1]


def analyse(rows, marker, top):
    names = short_names([r[3] for r in rows if r[2] == "k"])
    label = lambda r: names.get(r[3], r[3]) if r[2] == "k" else r[3].split(" bytes")[0]
    ends = [r[1] for r in rows if r[2] == "k" and marker in names.get(r[3], r[3])]
    if len(ends) < 3:
        hint = sorted({n for n in names.values() if "arg" in n.lower() or "max" in n.lower()})
        sys.exit(f"fewer than 3 kernels named *{marker}*; candidates: {hint[:20]}")
    steps = []
    i = 0
    for lo, hi in zip(ends, ends[1:]):
        while i < len(rows) and rows[i][0] <= lo:
            i += 1
        j = i
        inside = []
        while j < len(rows) and rows[j][0] <= hi:
            inside.append(rows[j])
            j += 1
        steps.append((lo, hi, inside))
    counts = collections.Counter(len(s[2]) for s in steps)
    mode = counts.most_common(1)[0][0]
    slack = max(2, mode // 50)
    decode = [s for s in steps if abs(len(s[2]) - mode) <= slack]
    wall, busy, short, long_ = [], [], [], []
    per_name = collections.defaultdict(lambda: [0, 0])
    for lo, hi, inside in decode:
        b, s, l = busy_and_gaps([(r[0], r[1]) for r in inside], lo, hi)
        wall.append(hi - lo)
        busy.append(b)
        short.append(s)
        long_.append(l)
        for r in inside:
            acc = per_name[label(r)]
            acc[0] += 1
            acc[1] += r[1] - r[0]
    n = len(decode)
    # The k-th piece of work of every step of exactly the most common count:
    # the same operation each step, so its median time is the op's.
    exact = [s for s in decode if len(s[2]) == mode]
    sequence = [
        {
            "name": label(exact[0][2][k]),
            "us": round(statistics.median((s[2][k][1] - s[2][k][0]) for s in exact) / 1000, 2),
        }
        for k in range(mode if exact else 0)
    ]
    us = lambda v: round(statistics.fmean(v) / 1000, 1)
    kernels = sorted(
        (
            {"name": k, "per_step": round(c / n, 2), "us_per_step": round(t / n / 1000, 1)}
            for k, (c, t) in per_name.items()
        ),
        key=lambda d: -d["us_per_step"],
    )
    return {
        "steps": len(steps),
        "decode_steps": n,
        "kernels_per_step": mode,  # the most common count
        "wall_us": us(wall),
        "wall_median_us": round(statistics.median(wall) / 1000, 1),
        "busy_us": us(busy),
        "short_gaps_us": us(short),
        "long_gaps_us": us(long_),
        "gap_threshold_us": GAP_US,
        "kernels": kernels[:top],
        "sequence": sequence,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("trace")
    p.add_argument("--marker", default="arg_reduce")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--json")
    p.add_argument("--sequence", type=int, default=0, metavar="N",
                   help="also print the first N pieces of work of a step, in order")
    a = p.parse_args()
    result = analyse(read(a.trace), a.marker, a.top)
    result["trace"] = a.trace
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps(result) + "\n")
    print(
        f"{a.trace}: {result['decode_steps']} decode steps of {result['steps']}, "
        f"{result['kernels_per_step']} kernels each; mean wall {result['wall_us']} µs "
        f"(median {result['wall_median_us']}), "
        f"busy {result['busy_us']}, short gaps {result['short_gaps_us']}, "
        f"long gaps {result['long_gaps_us']}"
    )
    for k in result["kernels"]:
        print(f"  {k['us_per_step']:8.1f} µs  {k['per_step']:6.2f}×  {k['name']}")
    for i, k in enumerate(result["sequence"][: a.sequence]):
        print(f"  #{i:<4} {k['us']:8.2f} µs  {k['name']}")


if __name__ == "__main__":
    main()
