#!/usr/bin/env python3
# SPDX-License-Identifier: EUPL-1.2
"""Time mlx-lm's LoRA trainer, for comparison with `infer-bench train`.

The same synthetic examples as the Rust driver (the prompt formula of
mlx_lm_bench.py, `seq` ids per row, 8 × batch rows, every token counted),
adapters as `mlx_lm.lora` makes them (linear_to_lora_layers on the top
`layers` layers, rank `rank`, scale 20, dropout 0), Adam at 1e-5, and
mlx_lm.tuner.trainer.train itself (its compiled step, its tokens/s and peak
memory per report window). One JSON record per report window after the
first (which includes compilation and warm-up).

Usage:
  python bench/mlx_lm_train_bench.py --model DIR --batch 4 --seq 128 --layers 16 \\
      --rank 8 --report 5 --runs 3 --out FILE.jsonl --label NAME [--grad-checkpoint]
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import mlx_lm
from mlx_lm.tuner.trainer import TrainingArgs, TrainingCallback, train
from mlx_lm.tuner.utils import linear_to_lora_layers

sys.path.insert(0, str(Path(__file__).parent))
from mlx_lm_bench import prompt_ids, vocab_size  # noqa: E402


class Capture(TrainingCallback):
    def __init__(self, window_peaks=False):
        self.reports = []
        self.window_peaks = window_peaks

    def on_train_loss_report(self, info):
        self.reports.append(info)
        # Each report's peak then is its window's own.
        if self.window_peaks:
            mx.reset_peak_memory()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--report", type=int, default=5)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--grad-checkpoint", action="store_true")
    p.add_argument("--window-peaks", action="store_true")
    p.add_argument("--out", required=True)
    p.add_argument("--label", required=True)
    a = p.parse_args()

    model, _ = mlx_lm.load(a.model)
    vocab = vocab_size(Path(a.model))
    model.freeze()
    linear_to_lora_layers(
        model, a.layers, {"rank": a.rank, "scale": 20.0, "dropout": 0.0}
    )
    data = [(prompt_ids(a.seq, row, vocab), 0) for row in range(8 * a.batch)]
    mx.random.seed(0)
    cap = Capture(a.window_peaks)
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArgs(
            batch_size=a.batch,
            iters=a.report * (a.runs + 1),
            steps_per_report=a.report,
            steps_per_eval=10**9,
            steps_per_save=10**9,
            max_seq_length=a.seq + 1,
            adapter_file=str(Path(tmp) / "adapters.safetensors"),
            grad_checkpoint=a.grad_checkpoint,
        )
        # What MLX holds before the first step (weights, adapters).
        active_start = mx.get_active_memory()
        mx.reset_peak_memory()
        # The trainer's progress display writes to stdout.
        stdout, sys.stdout = sys.stdout, sys.stderr
        try:
            train(model, optim.Adam(learning_rate=1e-5), data, None, args=args,
                  training_callback=cap)
        finally:
            sys.stdout = stdout
    with open(a.out, "a") as out:
        for i, r in enumerate(cap.reports):
            rec = {
                "engine": "mlx-lm",
                "label": a.label,
                "scenario": "train",
                "batch": a.batch,
                "prompt": a.seq,
                "layers": a.layers,
                "rank": a.rank,
                "run": i - 1,
                "train_tps": r["tokens_per_second"],
                "peak_memory_mb": r["peak_memory"] * 1e3,
                "active_start_mb": active_start / 1e6,
                "train_loss": r["train_loss"],
                "mlx_version": mx.__version__,
                "mlx_lm_version": mlx_lm.__version__,
                "grad_checkpoint": int(a.grad_checkpoint),
                "window_peaks": a.window_peaks,
            }
            line = json.dumps(rec)
            print(("(warm-up) " if i == 0 else "") + line, file=sys.stderr)
            if i > 0:
                out.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
