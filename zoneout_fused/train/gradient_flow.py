"""The gradient-flow experiment of the paper's Figure 6.

For an unregularized LSTM, a zoneout LSTM and a recurrent-dropout LSTM with the same initial
weights, runs a pMNIST-like sequence step by step through a ZoneoutLSTMCell, takes a
classification loss at the last step only, and records ||dL/dc_t|| for every t (via retain_grad),
averaged over a few batches and normalized by its maximum over t (t = 1..T-1: the loss, read from
h_T, does not depend on the zoned c_T). Writes a PNG and a CSV.

    python -m zoneout_fused.train.gradient_flow [--steps 784] [--hidden-size 100] ...
    python -m zoneout_fused.train --task gradient-flow [same options]

Input: permuted MNIST pixels when the MNIST files are found locally (see data.py; never
downloaded here), else uniform random pixels of the same shape (--data random forces this).
Computed in float64 by default (in float32 the gradient at early steps underflows to 0).
Models are measured at initialisation unless --train-steps > 0 (each then trains that many
steps on its own, with its own regularizer, before being measured).
"""
from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import ZoneoutLSTMCell
from . import data as D


class CellClassifier(nn.Module):
    def __init__(self, hidden_size: int, **cell_kw):
        super().__init__()
        self.cell = ZoneoutLSTMCell(1, hidden_size, **cell_kw)
        self.head = nn.Linear(hidden_size, 10)

    def forward(self, x, keep_cells: bool = False):
        """x [T, B, 1] -> logits [B, 10] and, with keep_cells, the c_t that retain their gradient."""
        h = c = None
        cells = []
        for t in range(x.shape[0]):
            h, c = self.cell(x[t], None if h is None else (h, c))
            if keep_cells:
                c.retain_grad()
                cells.append(c)
        return self.head(h), cells


def pixel_sequences(args, generator: torch.Generator):
    """[T, N, 1] inputs and [N] labels: pMNIST test images if found, else random pixels."""
    n = args.batch_size * (args.batches + max(1, args.train_steps))
    if args.data != "random":
        try:
            images = D.load_mnist(args.data_dir, download=False, valid_size=0, verify=False)
            x, y = images.test
            x, y = x[:n, :args.steps], y[:n]
            return x.t().unsqueeze(-1).contiguous(), y, "pmnist"
        except D.DataError as exc:
            if args.data == "pmnist":
                raise
            print(f"MNIST not found ({str(exc).split('. ')[0]}); using random pixel sequences")
    x = torch.rand(args.steps, n, 1, generator=generator)
    y = torch.randint(0, 10, (n,), generator=generator)
    return x, y, "random"


def gradient_norms(model: CellClassifier, x: torch.Tensor, y: torch.Tensor, batch_size: int, batches: int):
    """Mean over batches of ||dL/dc_t|| (norm over units, mean over examples), for t = 1..T-1."""
    model.train()  # masks are drawn: the gradient flows through the stochastic identity connections
    total = torch.zeros(x.shape[0] - 1, dtype=torch.float64)
    for b in range(batches):
        sl = slice(b * batch_size, (b + 1) * batch_size)
        logits, cells = model(x[:, sl], keep_cells=True)
        loss = F.cross_entropy(logits, y[sl])
        loss.backward()
        # c_T itself does not reach a loss taken from h_T (h~_T uses the un-zoned c~_T): t < T only.
        total += torch.stack([c.grad.norm(dim=-1).mean() for c in cells[:-1]]).double()
        model.zero_grad(set_to_none=True)
    return total / batches


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m zoneout_fused.train.gradient_flow",
                                description="Normalized ||dL/dc_t|| over t (the paper's Figure 6).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--steps", type=int, default=784, help="sequence length T (784: a whole pMNIST image)")
    p.add_argument("--hidden-size", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--dtype", choices=("float64", "float32"), default="float64",
                   help="float64: the unregularized gradient at t = 1 of 784 steps underflows float32 to 0")
    p.add_argument("--batches", type=int, default=1, help="batches averaged")
    p.add_argument("--zoneout-cell", type=float, default=0.5)
    p.add_argument("--zoneout-hidden", type=float, default=0.05)
    p.add_argument("--recurrent-dropout", type=float, default=0.25)
    p.add_argument("--train-steps", type=int, default=0, help="train each model this many steps first")
    p.add_argument("--lr", type=float, default=0.001, help="RMSProp lr for --train-steps")
    p.add_argument("--data", choices=("auto", "pmnist", "random"), default="auto")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--backend", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out-dir", default="runs/gradient-flow")
    return p


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = build_parser().parse_args(argv)
    if args.steps < 2:
        raise SystemExit("--steps must be at least 2")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(args.seed)
    x, y, source = pixel_sequences(args, generator)
    dtype = getattr(torch, args.dtype)
    x = x.to(dtype)
    settings = {
        "unregularized": dict(),
        f"zoneout (z_c={args.zoneout_cell}, z_h={args.zoneout_hidden})":
            dict(zoneout_cell=args.zoneout_cell, zoneout_hidden=args.zoneout_hidden),
        f"recurrent dropout (p={args.recurrent_dropout})": dict(recurrent_dropout=args.recurrent_dropout),
    }
    torch.manual_seed(args.seed)
    initial = CellClassifier(args.hidden_size, backend=args.backend).to(dtype).state_dict()
    curves = {}
    eval_batches = slice(0, args.batch_size * args.batches)
    for name, kw in settings.items():
        torch.manual_seed(args.seed + 1)  # the same mask stream start for every model
        model = CellClassifier(args.hidden_size, backend=args.backend, **kw).to(dtype)
        model.load_state_dict(initial)
        if args.train_steps:
            opt = torch.optim.RMSprop(model.parameters(), lr=args.lr, alpha=0.5)
            for s in range(args.train_steps):
                sl = slice(args.batch_size * (args.batches + s), args.batch_size * (args.batches + s + 1))
                loss = F.cross_entropy(model(x[:, sl])[0], y[sl])
                opt.zero_grad()
                loss.backward()
                nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
        norms = gradient_norms(model, x[:, eval_batches], y[eval_batches], args.batch_size, args.batches)
        curves[name] = norms / norms.max()
        print(f"{name}: ||dL/dc_1|| / max_t = {curves[name][0].item():.3e}", flush=True)

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = out / "gradient_flow.csv"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["t"] + list(curves))
        for t in range(args.steps - 1):
            writer.writerow([t + 1] + [f"{curves[k][t].item():.6e}" for k in curves])
    png_path = None
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 4))
        steps = range(1, args.steps)
        for name, curve in curves.items():
            values = curve.double().numpy().copy()
            values[values <= 0] = float("nan")  # exact zeros (underflow) have no place on a log axis
            ax.semilogy(steps, values, label=name)
        ax.set_xlabel("time step t")
        ax.set_ylabel("||dL/dc_t|| / max_t (log scale)")
        ax.set_title(f"gradient flow, loss at the last step ({source} input)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        png_path = out / "gradient_flow.png"
        fig.savefig(png_path, dpi=100)
        plt.close(fig)
    except ImportError:
        print("matplotlib is not installed: CSV only (pip install matplotlib)")
    print(f"done in {time.perf_counter() - started:.1f} s: {csv_path}" + (f", {png_path}" if png_path else ""))
    return {"curves": {k: v.tolist() for k, v in curves.items()}, "csv": str(csv_path),
            "png": str(png_path) if png_path else None, "source": source}


if __name__ == "__main__":
    main()
