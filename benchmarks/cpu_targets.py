"""The CPU backend's targets, measured side by side (forward + backward, float32, training).

    python benchmarks/cpu_targets.py [--repeats 15] [--threads 2] [--clock wall|cpu]

Targets (z_c = 0.5, z_h = 0.05): ZoneoutLSTM(backend="cpu") takes no longer than torch.nn.LSTM
(no zoneout) and is at least 5x faster than ZoneoutLSTM(backend="reference"). The contenders run
interleaved (one repeat of each in turn) so that drift in machine load hits them alike; the
table shows medians. On a shared, loaded machine wall-clock times with several threads mostly
measure waiting; `--threads 1 --clock cpu` (process CPU time) is then the steadier comparison.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import zoneout_fused as zf

CONFIGS = [dict(B=32, T=100, I=64, H=256), dict(B=64, T=50, I=32, H=128)]


def _step_fn(module, x):
    """One forward + backward through the output and both final states."""

    def step():
        module.zero_grad(set_to_none=True)
        x.grad = None
        output, (h_n, c_n) = module(x)
        (output.sum() + h_n.sum() + c_n.sum()).backward()

    return step


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def _time(fn, clock) -> float:
    start = clock()
    fn()
    return clock() - start


def run(config, repeats: int, clock=time.perf_counter) -> dict:
    torch.manual_seed(0)
    B, T, I, H = config["B"], config["T"], config["I"], config["H"]
    lstm = nn.LSTM(I, H)
    zoneout = dict(zoneout_cell=0.5, zoneout_hidden=0.05)
    fused = zf.ZoneoutLSTM.from_lstm(lstm, backend="cpu", **zoneout).train()
    reference = zf.ZoneoutLSTM.from_lstm(lstm, backend="reference", **zoneout).train()
    x = torch.randn(T, B, I, requires_grad=True)
    contenders = {"nn.LSTM (no zoneout)": _step_fn(lstm, x), "cpu (fused)": _step_fn(fused, x),
                  "reference": _step_fn(reference, x)}
    for fn in contenders.values():  # warm-up
        fn()
        fn()
    times = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            times[name].append(_time(fn, clock))
    return {name: statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, forward + backward, "
          f"median of {args.repeats} interleaved repeats, {args.clock} clock (ms)")
    header = (f"{'B':>3} {'T':>4} {'I':>3} {'H':>4} | {'nn.LSTM':>8} {'cpu':>8} {'reference':>9} | "
              f"{'cpu/nn.LSTM':>11} {'ref/cpu':>8} | targets (<= 1.0, >= 5.0)")
    print(header)
    print("-" * len(header))
    for config in CONFIGS:
        med = run(config, args.repeats, CLOCKS[args.clock])
        lstm_ms, cpu_ms, ref_ms = (1e3 * med[k] for k in ("nn.LSTM (no zoneout)", "cpu (fused)", "reference"))
        ok = "met" if cpu_ms <= lstm_ms and ref_ms / cpu_ms >= 5 else "MISSED"
        print(f"{config['B']:>3} {config['T']:>4} {config['I']:>3} {config['H']:>4} | {lstm_ms:8.2f} {cpu_ms:8.2f} "
              f"{ref_ms:9.2f} | {cpu_ms / lstm_ms:11.2f} {ref_ms / cpu_ms:8.1f} | {ok}")


if __name__ == "__main__":
    main()
