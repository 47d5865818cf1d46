"""`python -m zoneout_fused.train.compare`: the paper's regularizer comparison at a CPU's scale.

Krueger et al. (2017, Table 2, Figure 4b) compare zoneout with no regularization, recurrent
dropout and other regularizers on Penn Treebank. At their scale (2 x 1500 units, 55 epochs) that
takes GPU days; here the same comparison runs on word-level PTB with Zaremba et al.'s small
model (2 x 200 units, SGD at a constant lr 1, clip 5, uniform init 0.1, no dropout, batches of
20 x 35) trained on the first 150 windows of each batch stream (105,000 of the 929,589 training
tokens) for 12 epochs: a budget in which the unregularized model overfits. (A first try halving
the lr every epoch from the 4th, 8 epochs, stopped learning before anything overfitted: valid
perplexity was still falling at epoch 5, 298 unregularized, 303 with zoneout.)
Every run has the same data, seed and budget; only the regularizer changes.

    python -m zoneout_fused.train.compare commands      # the exact training commands
    python -m zoneout_fused.train.compare run --jobs 2  # runs (or resumes) them, 1 thread each
    python -m zoneout_fused.train.compare report        # table (markdown, JSON) and curve plot

A run that was interrupted resumes from its checkpoint; a finished one (its log.json has the
final test figure) is not run again.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

# The reduced scale: overrides of the word-ptb preset, the same for every run.
SCALE = ("--task word-ptb --hidden-size 200 --embed-size 200 --layers 2 --dropout 0 --lr 1 --lr-decay 1 "
         "--clip 5 --init-scale 0.1 --batch-size 20 --seq-len 35 --epochs 12 --steps-per-epoch 150 "
         "--threads 1 --seed 0 --no-progress").split()

# name -> the regularizer's options (the paper's z_c, z_h first; its word-level setting; recurrent
# dropout, its main rival; static identity connections, its appendix variant).
RUNS = {
    "none": "--regularizer none",
    "zoneout c0.5 h0.05": "--regularizer zoneout --zoneout-cell 0.5 --zoneout-hidden 0.05",
    "zoneout c0.25 h0.025": "--regularizer zoneout --zoneout-cell 0.25 --zoneout-hidden 0.025",
    "zoneout c0.1 h0.1": "--regularizer zoneout --zoneout-cell 0.1 --zoneout-hidden 0.1",
    "recurrent dropout 0.25": "--regularizer recurrent-dropout --recurrent-dropout 0.25",
    "static zoneout c0.5 h0.05": "--regularizer zoneout-static --zoneout-cell 0.5 --zoneout-hidden 0.05",
}

DEFAULT_RUNS_DIR = Path("runs") / "ptb-small"
DEFAULT_RESULTS_DIR = Path("benchmarks") / "results" / "ptb-small"


def run_dir(runs_dir: Path, name: str) -> Path:
    return runs_dir / name.replace(" ", "_")


def command(name: str, runs_dir: Path) -> list[str]:
    return ([sys.executable, "-m", "zoneout_fused.train", *SCALE, *RUNS[name].split(), "--out-dir",
             str(run_dir(runs_dir, name))])


def finished(out_dir: Path) -> bool:
    log = out_dir / "log.json"
    return log.exists() and "final" in json.loads(log.read_text())


def run_all(names: list[str], runs_dir: Path, jobs: int) -> int:
    """Runs the not yet finished runs, `jobs` at a time; returns how many failed."""
    pending = [name for name in names if not finished(run_dir(runs_dir, name))]
    running: list[tuple[str, subprocess.Popen]] = []
    failures = 0
    while pending or running:
        while pending and len(running) < jobs:
            name = pending.pop(0)
            out_dir = run_dir(runs_dir, name)
            out_dir.mkdir(parents=True, exist_ok=True)
            cmd = command(name, runs_dir) + (["--resume"] if (out_dir / "checkpoint.pt").exists() else [])
            print(f"[{time.strftime('%H:%M:%S')}] start {name}: {shlex.join(cmd)}", flush=True)
            with open(out_dir / "stdout.txt", "a") as out:
                running.append((name, subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)))
        time.sleep(2)
        for name, process in list(running):
            if process.poll() is not None:
                running.remove((name, process))
                failures += process.returncode != 0
                print(f"[{time.strftime('%H:%M:%S')}] {name}: exit {process.returncode}", flush=True)
    return failures


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} logical CPUs)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def summarize(name: str, log: dict) -> dict:
    """Best validation perplexity, the epoch it came at, test perplexity of that model, times."""
    metric = log["metric"]
    valid = [row for row in log["history"] if row["split"] == "valid"]
    train = [row for row in log["history"] if row["split"] == "train"]
    best = min(valid, key=lambda row: row[metric])
    final = log.get("final", {})
    epochs = max(row["epoch"] for row in valid)
    return dict(run=name, options=RUNS.get(name, ""), best_valid=best[metric], best_epoch=best["epoch"],
                test_at_best=final.get("test", {}).get(metric), last_valid=valid[-1][metric],
                last_train=train[-1][metric] if train else None, epochs=epochs,
                seconds_per_epoch=(final.get("train_time_s") or valid[-1]["elapsed_s"]) / epochs,
                backend=log["config"]["backend"], finished="final" in log,
                valid_curve=[(row["epoch"], row[metric]) for row in valid],
                train_curve=[(row["epoch"], row[metric]) for row in train])


def report(names: list[str], runs_dir: Path, results_dir: Path, commit: str | None) -> str:
    rows = []
    for name in names:
        log_path = run_dir(runs_dir, name) / "log.json"
        if log_path.exists():
            rows.append(summarize(name, json.loads(log_path.read_text())))
    if not rows:
        raise SystemExit(f"no runs with a log.json under {runs_dir}")
    results_dir.mkdir(parents=True, exist_ok=True)
    machine = cpu_model()
    header = (f"Word-level PTB, 2 x 200 LSTM, 12 epochs on 105,000 training tokens (`python -m "
              f"zoneout_fused.train.compare`), seed 0, backend cpu, 1 thread per run, two runs at a time on "
              f"{machine}; table made at commit {(commit or 'unknown')[:12]}. Perplexities: best validation over "
              f"the epochs, test of that model; s / epoch: training time, on a machine shared with other work.")
    lines = [header, "", "| run | best valid ppl | at epoch | test ppl (best model) | last valid ppl | last train ppl "
             "| s / epoch |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: r["best_valid"]):
        fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
        lines.append(f"| {r['run']}{'' if r['finished'] else ' (unfinished)'} | {fmt(r['best_valid'])} | "
                     f"{r['best_epoch']} | {fmt(r['test_at_best'])} | {fmt(r['last_valid'])} | {fmt(r['last_train'])} "
                     f"| {r['seconds_per_epoch']:.0f} |")
    table = "\n".join(lines) + "\n"
    (results_dir / "table.md").write_text(table)
    (results_dir / "results.json").write_text(json.dumps(
        {"machine": machine, "commit": commit, "scale": SCALE, "runs": rows}, indent=1) + "\n")
    plot(rows, results_dir / "valid-curves.png")
    return table


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        epochs, values = zip(*r["valid_curve"])
        line, = ax.plot(epochs, values, marker="o", label=r["run"])
        t_epochs, t_values = zip(*r["train_curve"])
        ax.plot(t_epochs, t_values, linestyle=":", color=line.get_color(), alpha=0.6)
    ax.set_xlabel("epoch")
    ax.set_ylabel("perplexity (solid: validation, dotted: training)")
    ax.set_yscale("log")
    ax.set_title("Word-level PTB, 2 x 200 LSTM, 105k training tokens")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m zoneout_fused.train.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=("commands", "run", "report"))
    parser.add_argument("--runs", default=",".join(RUNS), help="comma list of run names (default: all)")
    parser.add_argument("--runs-dir", type=Path, default=DEFAULT_RUNS_DIR)
    parser.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS_DIR)
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (each uses one thread)")
    opts = parser.parse_args(argv)
    names = [n.strip() for n in opts.runs.split(",") if n.strip()]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        parser.error(f"--runs: unknown {unknown}; choose from {list(RUNS)}")
    if opts.jobs < 1:
        parser.error("--jobs must be >= 1")
    if opts.action == "commands":
        for name in names:
            print(shlex.join(["python", *command(name, opts.runs_dir)[1:]]))
    elif opts.action == "run":
        sys.exit(1 if run_all(names, opts.runs_dir, opts.jobs) else 0)
    else:
        print(report(names, opts.runs_dir, opts.results_dir, git_commit()), end="")


if __name__ == "__main__":
    main()
