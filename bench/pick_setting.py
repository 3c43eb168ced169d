# SPDX-License-Identifier: EUPL-1.2
"""Which setting of `gpu.sh envs` (our engine alone) decodes fastest.

    python3 pick_setting.py OUT.jsonl SETTING...

Reads OUT-ours-SETTING.jsonl for each SETTING (as `gpu.sh envs` names them),
prints each setting's median decode tok/s per prompt and decode length and its ratios
to `default` on stderr, and the choice on stdout: a setting other than
`default` is chosen only when its mean ratio is above 1.01 and no prompt
cell loses more than 2 %; else `default`.
"""
import json
import re
import statistics
import sys


def medians(path):
    """Median decode tok/s per (prompt, decode) length of the records in `path`."""
    by = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                if r.get("decode_tps"):
                    by.setdefault((r["prompt"], r["decode"]), []).append(r["decode_tps"])
    return {k: statistics.median(v) for k, v in sorted(by.items())}


def main(out, settings):
    table = {}
    for s in settings:
        path = out[: -len(".jsonl")] + "-ours-" + re.sub(r"[^A-Za-z0-9_.-]", "_", s) + ".jsonl"
        try:
            table[s] = medians(path)
        except OSError as e:
            print(f"{s}: {e}", file=sys.stderr)
            continue
        print(s, {k: round(v, 1) for k, v in table[s].items()}, file=sys.stderr)
    base = table.get("default")
    best, best_mean = "default", 1.01
    for s, row in table.items():
        if s == "default" or not base:
            continue
        ratios = [row[k] / base[k] for k in base if k in row]
        if not ratios:
            continue
        mean = statistics.mean(ratios)
        print(s, "÷ default", [round(x, 3) for x in ratios], "mean", round(mean, 3), file=sys.stderr)
        if mean > best_mean and min(ratios) > 0.98:
            best, best_mean = s, mean
    print(best)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
