#!/usr/bin/env python3
# SPDX-License-Identifier: EUPL-1.2
"""Benchmark mlx-lm through its Python API, for comparison with our Rust engine.

Four scenarios, all driven purely by token ids (no tokeniser), greedy
(argmax) sampling on mlx-lm's default generation stream:

  single  one prompt of P ids, D generated tokens (time to first token,
          prefill and decode rates)
  batch   B prompts of P ids each, D tokens per row, through mlx-lm's
          BatchGenerator, then the same prompts one after another with
          generate_step
  streams S calls of P ids and D tokens, arriving evenly over SPREAD ms,
          through one BatchGenerator (aggregate tokens/s, time to first
          token p50 and p99)
  chat    second-turn time to first token with and without reusing the KV
          cache from the first turn

The Rust benchmark binary uses the same prompt formula and timing points, so
the JSON lines written here can be compared directly with its output.

Usage:
  python bench/mlx_lm_bench.py --model DIR --scenario single --prompt P --decode D \\
      --runs R [--warmup W] --out FILE.jsonl [--label NAME]
  python bench/mlx_lm_bench.py ... --scenario batch --prompt P --decode D --batch B
  python bench/mlx_lm_bench.py ... --scenario chat --history H --reply T --new N
"""

import argparse
import os
import json
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx_lm
from mlx_lm.generate import BatchGenerator, generate_step
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.utils import load_model


def prompt_ids(n, row, vocab):
    """Deterministic prompt of `n` ids for batch row `row` (shared with Rust)."""
    lo = min(100, vocab // 4)
    span = min(29000, vocab - lo)
    return [lo + ((i + 1009 * row) * 7919) % span for i in range(n)]


def argmax(logprobs):
    """Greedy sampler: the most probable token along the vocabulary axis."""
    return mx.argmax(logprobs, axis=-1)


def vocab_size(model_dir):
    """The model's vocabulary size from config.json (top level or text_config)."""
    config = json.loads((model_dir / "config.json").read_text())
    if "vocab_size" in config:
        return int(config["vocab_size"])
    return int(config["text_config"]["vocab_size"])


def settle():
    """Wait for all queued work and release cached buffers (outside timings)."""
    mx.synchronize()
    mx.clear_cache()


def timed_stream(model, ids, max_tokens, cache=None):
    """Run generate_step on `ids`; return (t0, t_first, t_last, tokens).

    Times are perf_counter() readings: t0 just before the call, t_first when
    the first token is in hand, t_last when the last one is.
    """
    tokens = []
    t_first = t_last = None
    t0 = time.perf_counter()
    for token, _ in generate_step(
        mx.array(ids), model, max_tokens=max_tokens, sampler=argmax,
        prompt_cache=cache,
    ):
        t_last = time.perf_counter()
        if t_first is None:
            t_first = t_last
        tokens.append(token)
    if len(tokens) != max_tokens:
        raise RuntimeError(f"generate_step gave {len(tokens)} tokens, wanted {max_tokens}")
    return t0, t_first, t_last, tokens


class Profiled:
    """A model wrapper that sums the time spent building forward graphs
    (calls of the model) and the time `mx.async_eval` takes, the two host-side
    costs of a decode step (the Rust engine logs the same split)."""

    def __init__(self, model):
        self._model = model
        self.build = 0.0
        self.dispatch = 0.0
        self.steps = 0
        self._async_eval = mx.async_eval

    def __getattr__(self, name):
        return getattr(self._model, name)

    def __call__(self, *args, **kwargs):
        t = time.perf_counter()
        out = self._model(*args, **kwargs)
        self.build += time.perf_counter() - t
        self.steps += 1
        return out

    def async_eval(self, *args):
        t = time.perf_counter()
        self._async_eval(*args)
        self.dispatch += time.perf_counter() - t


def run_single(model, args, vocab):
    """One single-stream run: P prompt ids, D greedy tokens."""
    settle()
    prof = None
    if args.profile:
        prof = Profiled(model)
        mx.async_eval = prof.async_eval
        model = prof
    try:
        t0, t_first, t_last, ids = timed_stream(
            model, prompt_ids(args.prompt, 0, vocab), args.decode)
    finally:
        if prof is not None:
            mx.async_eval = prof._async_eval
    settle()
    ttft = t_first - t0
    decode_s = t_last - t_first
    rec = {
        "ttft_s": ttft,
        "prefill_tps": args.prompt / ttft,
        "decode_s": decode_s,
        "decode_tps": (args.decode - 1) / decode_s if args.decode > 1 else None,
        "generated": args.decode,
        "first_ids": list(ids[:16]),
    }
    if prof is not None and prof.steps > 1:
        # The prompt's forward and each decode step's (the first is prefill).
        rec["build_us"] = prof.build / prof.steps * 1e6
        rec["dispatch_us"] = prof.dispatch / prof.steps * 1e6
    summary = (f"ttft {ttft * 1e3:.1f} ms, prefill {rec['prefill_tps']:.1f} tok/s, "
               f"decode {rec['decode_tps'] or 0:.1f} tok/s")
    return rec, summary


def batch_generate_ids(model, prompts, max_tokens):
    """Generate `max_tokens` greedy tokens per prompt with BatchGenerator.

    No stop tokens are given, so every row runs to exactly `max_tokens`
    (finish reason "length"). The prefill and completion batch sizes are set
    to the number of prompts so that all rows are prefilled and decoded
    together. Returns (seconds from submission to the last token, rows).
    """
    n = len(prompts)
    gen = BatchGenerator(
        model, stop_tokens=None, sampler=argmax,
        completion_batch_size=max(n, 32), prefill_batch_size=max(n, 8),
    )
    try:
        t0 = time.perf_counter()
        uids = gen.insert(prompts, [max_tokens] * n)
        rows = {uid: [] for uid in uids}
        reasons = {}
        while len(reasons) < n:
            responses = gen.next_generated()
            if not responses:
                break
            for r in responses:
                rows[r.uid].append(r.token)
                if r.finish_reason is not None:
                    reasons[r.uid] = r.finish_reason
        elapsed = time.perf_counter() - t0
    finally:
        gen.close()
    out = [rows[uid] for uid in uids]
    for i, uid in enumerate(uids):
        if len(out[i]) != max_tokens or reasons.get(uid) != "length":
            raise RuntimeError(f"batch row {i}: {len(out[i])} tokens, "
                               f"finish {reasons.get(uid)!r}, wanted {max_tokens}")
    return elapsed, out


def run_batch(model, args, vocab):
    """One batch run: B rows together, then the same rows one after another."""
    b, d = args.batch, args.decode
    prompts = [prompt_ids(args.prompt, row, vocab) for row in range(b)]
    settle()
    batch_s, batch_rows = batch_generate_ids(model, prompts, d)
    # Sequential: each row exactly as in `single`; the sum of t0 -> D-th token.
    sequential_s = 0.0
    seq_rows = []
    for ids in prompts:
        settle()
        t0, _, t_last, tokens = timed_stream(model, ids, d)
        sequential_s += t_last - t0
        seq_rows.append(tokens)
    settle()
    same = batch_rows == seq_rows
    if not same:
        bad = [i for i in range(b) if batch_rows[i] != seq_rows[i]]
        print(f"warning: batch rows {bad} differ from single-stream greedy ids",
              file=sys.stderr)
    batch_tps = b * d / batch_s
    sequential_tps = b * d / sequential_s
    rec = {
        "batch_s": batch_s,
        "batch_tps": batch_tps,
        "sequential_s": sequential_s,
        "sequential_tps": sequential_tps,
        "speedup": batch_tps / sequential_tps,
        "generated": b * d,
        "batch_matches_sequential": same,
    }
    summary = (f"batch {batch_tps:.1f} tok/s, sequential {sequential_tps:.1f} tok/s, "
               f"speedup x{rec['speedup']:.2f}")
    return rec, summary


def percentile(v, p):
    """The p-th percentile of sorted `v` (nearest rank), as the Rust driver."""
    if not v:
        return 0.0
    rank = min(max(int(-(-p / 100 * len(v) // 1)), 1), len(v))
    return v[rank - 1]


def run_streams(model, args, vocab):
    """S calls of P ids and D tokens, arriving evenly over SPREAD ms (0: at
    once), served by one BatchGenerator (every call in one decode batch, as
    the Rust engine is given as many slots): aggregate tokens/s and each
    call's time to first token from its arrival."""
    n, d = args.streams, args.decode
    spread = (getattr(args, "spread_ms", None) or 0) / 1000
    prompts = [prompt_ids(args.prompt, row, vocab) for row in range(n)]
    settle()
    gen = BatchGenerator(
        model, stop_tokens=None, sampler=argmax, completion_batch_size=max(n, 32),
    )
    try:
        start = time.perf_counter() + 0.02
        arrive = [start + spread * i / n for i in range(n)]
        waiting = list(range(n))
        row_of, first, count, end = {}, {}, {}, start
        finished = 0
        while finished < n:
            now = time.perf_counter()
            ready = [i for i in waiting if arrive[i] <= now]
            if ready:
                uids = gen.insert([prompts[i] for i in ready], [d] * len(ready))
                for i, u in zip(ready, uids):
                    row_of[u] = i
                    count[u] = 0
                waiting = [i for i in waiting if arrive[i] > now]
            responses = gen.next_generated() if row_of else []
            if not responses:
                if waiting:
                    time.sleep(max(0.0, min(arrive[i] for i in waiting) - time.perf_counter()))
                    continue
                if finished < n:
                    raise RuntimeError(f"BatchGenerator stopped with {finished}/{n} calls done")
            t = time.perf_counter()
            for r in responses:
                first.setdefault(r.uid, t)
                count[r.uid] += 1
                if r.finish_reason is not None:
                    finished += 1
                    end = max(end, t)
    finally:
        gen.close()
    for u, c in count.items():
        if c != d:
            raise RuntimeError(f"call {row_of[u]}: {c} tokens, wanted {d}")
    ttfts = sorted(first[u] - arrive[row_of[u]] for u in first)
    wall = end - start
    rec = {
        "wall_s": wall,
        "stream_tps": n * d / wall,
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p99_s": percentile(ttfts, 99),
    }
    summary = (f"{rec['stream_tps']:.1f} tok/s over {n} calls, ttft p50 "
               f"{rec['ttft_p50_s'] * 1e3:.0f} ms, p99 {rec['ttft_p99_s'] * 1e3:.0f} ms")
    return rec, summary


def first_token(model, ids, cache):
    """Time to the first greedy token of `ids` on `cache`; return (seconds, token)."""
    t0, t_first, _, tokens = timed_stream(model, ids, 1, cache)
    return t_first - t0, tokens[0]


def run_chat(model, args, vocab):
    """One chat run: turn 1, turn 2 reusing the cache, turn 2 from scratch."""
    history = prompt_ids(args.history, 0, vocab)
    new = prompt_ids(args.new, 1, vocab)
    settle()
    cache = make_prompt_cache(model)
    _, _, _, reply = timed_stream(model, history, args.reply, cache)
    settle()
    # generate_step dispatches the step that feeds the last yielded token, so
    # the cache should hold history + all T reply ids.
    cached = max(getattr(c, "offset", 0) for c in cache)
    if cached != args.history + args.reply:
        print(f"warning: cache holds {cached} positions after turn 1, "
              f"expected {args.history + args.reply}", file=sys.stderr)
    reuse_s, reuse_tok = first_token(model, new, cache)
    settle()
    fresh_ids = history + reply + new
    fresh_s, fresh_tok = first_token(model, fresh_ids, make_prompt_cache(model))
    settle()
    if reuse_tok != fresh_tok:
        print(f"warning: reuse first token {reuse_tok} != fresh first token {fresh_tok}",
              file=sys.stderr)
    rec = {
        "cached_positions": cached,
        "reuse_prefilled": len(new),
        "reuse_ttft_s": reuse_s,
        "fresh_prefilled": len(fresh_ids),
        "fresh_ttft_s": fresh_s,
        "speedup": fresh_s / reuse_s,
        "reuse_matches_fresh": reuse_tok == fresh_tok,
    }
    summary = (f"reuse ttft {reuse_s * 1e3:.1f} ms ({len(new)} ids), fresh ttft "
               f"{fresh_s * 1e3:.1f} ms ({len(fresh_ids)} ids), x{rec['speedup']:.2f}")
    return rec, summary


SCENARIOS = {
    "single": (run_single, ("prompt", "decode")),
    "batch": (run_batch, ("prompt", "decode", "batch")),
    "streams": (run_streams, ("prompt", "decode", "streams")),
    "chat": (run_chat, ("history", "reply", "new")),
}


def parse_args(argv=None):
    """Parse and check the command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, type=Path, help="model directory")
    p.add_argument("--scenario", choices=sorted(SCENARIOS))
    p.add_argument("--plan", type=Path,
                   help="a JSON list of steps ({scenario, its parameters, optional runs "
                        "and warmup}) run one after another on one loaded model, "
                        "instead of --scenario")
    p.add_argument("--runs", type=int, default=3, help="measured runs (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="unrecorded runs first (default 1)")
    p.add_argument("--out", required=True, type=Path, help="JSON lines file to append to")
    p.add_argument("--label", help="label for the records (default: model dir name)")
    p.add_argument("--tensor-parallel", action="store_true",
                   help="shard the model over mx.distributed.init()'s group (mlx-lm's "
                        "sharded_load; ranks started with MLX's environment); rank 0 writes")
    p.add_argument("--profile", action="store_true",
                   help="single: also record the mean host time per model call "
                        "spent building graphs and in mx.async_eval")
    for name, what in (("prompt", "prompt ids per row"), ("decode", "tokens to generate"),
                       ("batch", "rows in the batch"), ("streams", "concurrent calls"),
                       ("spread_ms", "ms over which the calls arrive"),
                       ("history", "chat history ids"),
                       ("reply", "turn-1 reply tokens"), ("new", "turn-2 new ids")):
        p.add_argument(f"--{name}", type=int, help=f"{what}")
    args = p.parse_args(argv)
    if (args.plan is None) == (args.scenario is None):
        p.error("give either --scenario or --plan")
    steps = []
    if args.plan is not None:
        for item in json.loads(args.plan.read_text()):
            step = argparse.Namespace(**{**vars(args), **item})
            if step.scenario not in SCENARIOS:
                p.error(f"unknown scenario in the plan: {step.scenario!r}")
            steps.append(step)
    else:
        steps.append(args)
    for step in steps:
        missing = [f"--{k}" for k in SCENARIOS[step.scenario][1] if getattr(step, k) is None]
        if missing:
            p.error(f"scenario {step.scenario} needs {' '.join(missing)}")
        for k in SCENARIOS[step.scenario][1]:
            if getattr(step, k) < 1:
                p.error(f"--{k} must be at least 1")
    return args, steps


def main(argv=None):
    """Load the model once, run each step, append one JSON line per measured run."""
    args, steps = parse_args(argv)
    group = mx.distributed.init() if args.tensor_parallel else None
    if group is not None and group.size() > 1:
        from mlx_lm.utils import sharded_load
        model, _ = sharded_load(str(args.model), tensor_group=group)
    else:
        model, _ = load_model(args.model)
    world_size = group.size() if group is not None else 1
    vocab = vocab_size(args.model)
    label = args.label or args.model.resolve().name
    env = {
        "mlx_version": mx.__version__,
        "mlx_lm_version": mlx_lm.__version__,
        "device": str(mx.default_device()),
    }
    env["world_size"] = world_size
    # Every rank runs each step (the sums need them all); rank 0 writes.
    leader = group is None or group.rank() == 0
    with open(args.out if leader else os.devnull, "a", encoding="utf-8") as out:
        for step in steps:
            run, params = SCENARIOS[step.scenario]
            common = {
                "engine": "mlx-lm",
                "label": label,
                "scenario": step.scenario,
                **{k: getattr(step, k) for k in params},
                **({"spread_ms": getattr(step, "spread_ms", None) or 0}
                   if step.scenario == "streams" else {}),
            }
            for i in range(step.warmup + step.runs):
                rec, summary = run(model, step, vocab)
                measured = i >= step.warmup
                tag = f"run {i - step.warmup}" if measured else f"warm-up {i}"
                print(f"[mlx-lm {label} {step.scenario}] {tag}: {summary}", file=sys.stderr)
                if measured:
                    out.write(json.dumps({**common, "run": i - step.warmup, **rec, **env}) + "\n")
                    out.flush()


if __name__ == "__main__":
    main()
