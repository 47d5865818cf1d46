"""Command line of `python -m zoneout_fused.train`: a task preset, then any value overridden."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from typing import Optional, Sequence

from .tasks import CELL_PRESETS, CELLS, DEFAULT_TASK, PRESETS, REGULARIZERS, TASKS, Config

HELP = {
    "task": "what to train (default: copy, built in, no download; gradient-flow: the paper's Figure 6, "
            "see python -m zoneout_fused.train.gradient_flow --help)",
    "data_dir": "where data files are looked for first (then DATA_DIR/<name>, then ../shared/data/<name>) "
                "and downloaded to",
    "out_dir": "logs (log.csv, log.json), curves.png and the default checkpoint (default runs/<task>)",
    "no_download": "never download data (also: ZONEOUT_FUSED_OFFLINE=1)",
    "regularizer": "which regularizer (the paper's comparisons)",
    "cell": "recurrent cell: lstm (the default), gru, rnn-tanh or rnn-relu; with --task char-ptb, gru and rnn-tanh "
            "take the paper's settings for them (Adam lr 0.001 / 0.0003, z_h = 0.05, no z_c)",
    "zoneout_cell": "z_c: probability that a cell unit keeps its previous value (LSTM only)",
    "zoneout_hidden": "z_h: probability that a hidden unit keeps its previous value",
    "recurrent_dropout": "p for --regularizer recurrent-dropout (Semeniuta et al. 2016)",
    "stochastic_depth_p": "probability that an example skips a whole step, for --regularizer stochastic-depth",
    "weight_noise_sigma": "std of the Gaussian noise on every weight matrix, for --regularizer weight-noise",
    "norm_stabilizer_beta": "beta of the norm-stabilizer penalty, for --regularizer norm-stabilizer",
    "dropout": "dropout on non-recurrent connections (embedding, between layers, before the output)",
    "max_steps": "stop after this many optimizer steps in all (0: no limit)",
    "steps_per_epoch": "cap on the steps of an epoch (0: a full pass over the data)",
    "eval_every": "also evaluate every N steps (0: once per epoch)",
    "eval_batches": "cap on evaluation batches (0: the whole split)",
    "patience": "early stopping after this many evaluations without improvement (0: off)",
    "backend": "zoneout_fused backend: auto, reference, cpu, triton, cuda",
    "checkpoint": "checkpoint path (default OUT_DIR/checkpoint.pt); written at every evaluation",
    "resume": "resume from --checkpoint (model, optimizer, scheduler, position, RNG states)",
    "threads": "torch CPU threads (0: torch's default)",
    "loss_reduction": "training loss of the language models: mean over steps and examples, or summed over "
                      "the steps of a window (Zaremba et al.'s, for their SGD lr)",
    "lr_decay": "multiply the learning rate by this after every epoch past --lr-decay-start",
    "forget_bias": "added to the forget-gate bias at initialisation",
    "log_every": "refresh the progress bar's loss every N steps",
    "init_scale": "if > 0, initialise every parameter uniformly in [-s, s] (Zaremba et al.)",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m zoneout_fused.train",
        description="Train zoneout LSTMs (Krueger et al. 2017) on the paper's tasks. Each --task sets the "
                    "paper's hyperparameters as a preset; every option below overrides its preset value "
                    "(see the presets below, and --print-config for the resolved settings).",
        epilog="presets (other values: the Config defaults in zoneout_fused/train/tasks.py):\n" + "\n".join(
            f"  {task}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in preset.items())
            for task, preset in list(PRESETS.items()) + [(f"{t} --cell {c}", p) for (t, c), p in CELL_PRESETS.items()]),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=TASKS + ("gradient-flow",), default=DEFAULT_TASK, help=HELP["task"])
    for f in dataclasses.fields(Config):
        if f.name == "task":
            continue
        flag = "--" + f.name.replace("_", "-")
        help_text = HELP.get(f.name, " ")
        if f.type in ("bool", bool):
            if f.name in ("progress", "plot"):
                parser.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false",
                                    default=None, help={"progress": "no tqdm progress bar",
                                                        "plot": "no learning-curve PNG"}[f.name])
            else:
                parser.add_argument(flag, action="store_true", default=None, help=help_text)
            continue
        kind = {"int": int, "float": float}.get(f.type if isinstance(f.type, str) else f.type.__name__, str)
        kwargs = dict(type=kind, default=None, help=help_text)
        if f.name == "regularizer":
            kwargs["choices"] = REGULARIZERS
        if f.name == "loss_reduction":
            kwargs["choices"] = ("mean", "sum-over-time")
        if f.name == "cell":
            kwargs["choices"] = CELLS
        if f.name == "optimizer":
            kwargs["choices"] = ("adam", "sgd", "rmsprop")
        parser.add_argument(flag, **kwargs)
    parser.add_argument("--print-config", action="store_true", help="print the resolved settings and exit")
    return parser


def resolve_config(args: argparse.Namespace) -> Config:
    """Config defaults <- the task's preset <- what the command line gave."""
    values = dict(PRESETS[args.task])
    values["task"] = args.task
    if args.cell is not None:
        values.update(CELL_PRESETS.get((args.task, args.cell), {}))
    for f in dataclasses.fields(Config):
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = given
    return Config(**values)


def main(argv: Optional[Sequence[str]] = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    task_at = [i for i, a in enumerate(argv) if a == "--task" or a.startswith("--task=")]
    if task_at and (argv[task_at[-1]] == "--task=gradient-flow" or argv[task_at[-1] + 1:task_at[-1] + 2] == ["gradient-flow"]):
        # Its own options (and --help): everything but --task goes to the gradient-flow command.
        from . import gradient_flow
        i = task_at[-1]
        return gradient_flow.main(argv[:i] + argv[i + (1 if "=" in argv[i] else 2):])
    parser = build_parser()
    args = parser.parse_args(argv)
    cfg = resolve_config(args)
    if args.print_config:
        print(json.dumps(dataclasses.asdict(cfg), indent=1))
        return {"config": dataclasses.asdict(cfg)}

    from .loop import Trainer
    started = time.perf_counter()
    trainer = Trainer(cfg)
    try:
        if trainer.is_main:
            print(f"task {cfg.task}: {trainer.model.__class__.__name__}, {cfg.cell} {cfg.layers} x {cfg.hidden_size}, "
                  f"regularizer {cfg.regularizer}, backend {cfg.backend}, world size {trainer.world}", flush=True)
        final = trainer.fit()
        if trainer.is_main:
            report(cfg, final, time.perf_counter() - started)
        return final
    finally:
        trainer.close()


def report(cfg: Config, final: dict, seconds: float) -> None:
    metric = final["metric"]
    v, t = final["valid"], final["test"]
    print(f"done: {final['steps']} steps in {seconds:.1f} s")
    if cfg.task == "copy":
        chance = final["chance"]
        print(f"copy task (recall {cfg.copy_length} of {cfg.copy_symbols} symbols after {cfg.copy_delay} steps): "
              f"test accuracy {1 - t['error']:.3f} (chance {1 - chance['error']:.3f}), "
              f"test loss {t['loss']:.3f} nats (chance {chance['loss']:.3f})")
    print(f"valid {metric} {v[metric]:.4f}   test {metric} {t[metric]:.4f}")
    files = final.get("files", {})
    print("logs: " + ", ".join(str(p) for p in files.values() if p))
