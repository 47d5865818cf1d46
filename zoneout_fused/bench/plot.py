"""Time per step (forward + backward) against hidden size, one line per backend.

    python -m zoneout_fused.bench --device cpu --config sweep --json benchmarks/results/cpu-sweep.json
    python -m zoneout_fused.bench.plot benchmarks/results/cpu-sweep.json -o benchmarks/results/cpu-sweep.png

Reads the records of a --json result; records that were not timed (mismatch, error) are left
out, and said so on stdout. Cases with other B, T, I or layer counts than the most common are
left out too, so each line varies H alone.
"""
from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict


def load(paths: list[str]) -> list[dict]:
    records = []
    for path in paths:
        with open(path) as source:
            records += json.load(source)["records"]
    return records


def series(records: list[dict], mode: str, dtype: str):
    """{backend: [(H, us per step)]} for the commonest (B, T, I, layers), and that shape."""
    chosen = [r for r in records if r["mode"] == mode and r["dtype"] == dtype]
    if not chosen:
        raise SystemExit(f"no records with mode={mode!r} and dtype={dtype!r}")
    shape_of = lambda r: (r["batch"], r["steps"], r["input_size"], r["num_layers"])  # noqa: E731
    shape = Counter(shape_of(r) for r in chosen).most_common(1)[0][0]
    lines: dict = defaultdict(list)
    left_out = {}
    for record in chosen:
        if shape_of(record) != shape:
            continue
        if record["median_ms"] is None:
            print(f"left out {record['backend']} at H={record['hidden_size']}: {record['check']}"
                  f" ({record.get('error') or 'not timed'})")
            left_out.setdefault(record["backend"], record["check"])
            continue
        lines[record["backend"]].append((record["hidden_size"], record["median_ms"] / record["steps"] * 1e3))
    left_out = {b: why for b, why in left_out.items() if b not in lines}  # backends with no point at all
    return {backend: sorted(points) for backend, points in lines.items()}, shape, left_out


def plot(records: list[dict], output: str, mode: str = "fwd+bwd", dtype: str = "float32") -> str:
    import matplotlib
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    lines, (batch, steps, input_size, layers), left_out = series(records, mode, dtype)
    first = records[0]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for backend, points in lines.items():
        style = "--" if backend in ("reference", "reference-compiled") else "-"
        ax.plot([h for h, _ in points], [t for _, t in points], style, marker="o", label=backend)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    hidden = sorted({h for points in lines.values() for h, _ in points})
    ax.set_xticks(hidden, [str(h) for h in hidden])
    ax.set_xlabel("hidden size H")
    ax.set_ylabel(f"time per step, {mode} (µs, median)")
    ax.set_title(f"ZoneoutLSTM {mode}, B={batch} T={steps} I={input_size} layers={layers}, {dtype}", fontsize=10)
    commit = (first.get("commit") or "unknown")[:10] + ("+" if first.get("commit_dirty") else "")
    threads = f", torch threads {first['threads']}" if first.get("threads") else ""
    missing = "; not shown: " + ", ".join(f"{b} ({why})" for b, why in left_out.items()) if left_out else ""
    fig.text(0.01, 0.01, f"{first['device']}{threads}; torch {first['torch']}; commit {commit}{missing}",
             fontsize=7, color="0.4")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(output, dpi=120)
    plt.close(fig)
    return output


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(prog="python -m zoneout_fused.bench.plot", description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", help="result files written by python -m zoneout_fused.bench --json")
    parser.add_argument("-o", "--output", default="benchmarks/results/cpu-sweep.png")
    parser.add_argument("--mode", default="fwd+bwd", choices=("fwd", "fwd+bwd"))
    parser.add_argument("--dtype", default="float32")
    opts = parser.parse_args(argv)
    path = plot(load(opts.json), opts.output, opts.mode, opts.dtype)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
