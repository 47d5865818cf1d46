"""The training loop: one Trainer for every task, with evaluation, early stopping, checkpoints that
resume, CSV/JSON logs, learning-curve plots and DistributedDataParallel under torchrun."""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import data as D
from .tasks import (METRIC_NAMES, Config, CopyModel, LanguageModel, SequenceClassifier, WeightNoise,
                    make_copy_batch, metric_from_nats, norm_stabilizer_penalty)

try:
    from tqdm import tqdm
except ImportError:  # tqdm is a dependency; keep running without a bar if it is missing
    tqdm = None


# --- distributed --------------------------------------------------------------------------------
def dist_info():
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) when run plainly."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0"))


def init_distributed(cfg: Config):
    rank, world, local_rank = dist_info()
    if world > 1 and not dist.is_initialized():
        device = torch.device(cfg.device)
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend)
    return rank, world, local_rank


def resolve_device(cfg: Config, local_rank: int) -> torch.device:
    device = torch.device(cfg.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for but torch sees no CUDA device")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


# --- data per task ------------------------------------------------------------------------------
class TaskData:
    """Loads a task's data and turns it into training batches and evaluation passes."""

    def __init__(self, cfg: Config, rank: int, world: int, device: torch.device):
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        download = D.downloads_allowed(cfg.no_download)
        task = cfg.task
        self.kind = {"copy": "copy", "pmnist": "classify"}.get(task, "lm")
        if task in ("char-ptb", "word-ptb"):
            self.corpus = D.load_ptb(cfg.data_dir, "char" if task == "char-ptb" else "word", download)
        elif task == "text8":
            self.corpus = D.load_text8(cfg.data_dir, download)
        elif task == "pmnist":
            self.images = D.load_mnist(cfg.data_dir, download)
        if self.kind == "lm":
            # Each rank trains on its own contiguous shard of the training stream.
            train = self.corpus.train
            shard = train.numel() // world
            train = train[rank * shard:(rank + 1) * shard]
            self.train_stream = D.batchify(train, cfg.batch_size)
            self.eval_streams = {"valid": D.batchify(self.corpus.valid, cfg.batch_size),
                                 "test": D.batchify(self.corpus.test, cfg.batch_size)}
        elif self.kind == "copy":
            # Fixed evaluation sets from a private generator: identical on every rank and every run.
            g = torch.Generator().manual_seed(10_000)
            self.eval_sets = {split: make_copy_batch(cfg.eval_examples, cfg.copy_symbols, cfg.copy_length,
                                                     cfg.copy_delay, g) for split in ("valid", "test")}

    def make_model(self) -> nn.Module:
        cfg = self.cfg
        if self.kind == "lm":
            return LanguageModel(self.corpus.vocab_size, cfg)
        if self.kind == "classify":
            return SequenceClassifier(1, 10, cfg)
        return CopyModel(cfg)

    def steps_in_epoch(self) -> int:
        cfg = self.cfg
        if self.kind == "lm":
            n = D.lm_num_batches(self.train_stream, cfg.seq_len)
        elif self.kind == "classify":
            n = self.images.train[0].shape[0] // self.world // cfg.batch_size
        else:
            n = cfg.steps_per_epoch or 100
        return min(n, cfg.steps_per_epoch) if cfg.steps_per_epoch else n

    def train_batches(self, epoch: int, start: int):
        """Yields (index, batch) for an epoch, from batch `start` on (resume mid-epoch)."""
        cfg, n = self.cfg, self.steps_in_epoch()
        if self.kind == "lm":
            for index, x, y in D.lm_batches(self.train_stream, cfg.seq_len, start):
                if index >= n:
                    return
                yield index, (x, y)
        elif self.kind == "classify":
            # The same permutation on every rank (seeded by the epoch); each rank takes its slice.
            x_all, y_all = self.images.train
            order = torch.randperm(x_all.shape[0], generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch))
            order = order[self.rank::self.world]
            for index in range(start, n):
                idx = order[index * cfg.batch_size:(index + 1) * cfg.batch_size]
                yield index, (x_all[idx].t().unsqueeze(-1), y_all[idx])
        else:
            for index in range(start, n):
                g = torch.Generator().manual_seed(((cfg.seed * 1009 + epoch) * 100_003 + index) * 64 + self.rank)
                yield index, make_copy_batch(cfg.batch_size, cfg.copy_symbols, cfg.copy_length, cfg.copy_delay, g)


# --- the trainer --------------------------------------------------------------------------------
class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.rank, self.world, local_rank = init_distributed(cfg)
        self.is_main = self.rank == 0
        self.device = resolve_device(cfg, local_rank)
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        # Each rank draws its own masks (and noise): seed + rank.
        torch.manual_seed(cfg.seed + self.rank)
        random.seed(cfg.seed + self.rank)
        self.out_dir = Path(cfg.out_dir or f"runs/{cfg.task}")
        self.checkpoint_path = Path(cfg.checkpoint) if cfg.checkpoint else self.out_dir / "checkpoint.pt"

        self.data = TaskData(cfg, self.rank, self.world, self.device)
        if self.is_main:  # only once the data is there: a failed start leaves no empty run folder
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self.model = self.data.make_model().to(self.device)
        self.ddp = None
        if self.world > 1:
            self.ddp = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.optimizer = self._make_optimizer()
        decay, start = cfg.lr_decay, cfg.lr_decay_start
        # Stepped once per finished epoch e (1-based): lr * decay^(e - start + 1) from epoch `start` on.
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda e: decay ** max(0, e - start + 1) if decay != 1.0 else 1.0)
        self.weight_noise = WeightNoise(self.model, cfg.weight_noise_sigma) if cfg.regularizer == "weight-noise" else None
        self.metric = METRIC_NAMES[cfg.task]
        self.epoch, self.batch_in_epoch, self.step = 1, 0, 0
        self.best, self.bad_evals, self.best_state = math.inf, 0, None
        self.history: list[dict] = []
        self.elapsed = 0.0
        self.state = None  # carried recurrent state (language models)
        if cfg.resume:
            self.load_checkpoint()

    # --- setup ---
    def _make_optimizer(self):
        cfg, params = self.cfg, self.model.parameters()
        if cfg.optimizer == "adam":
            return torch.optim.Adam(params, lr=cfg.lr)
        if cfg.optimizer == "sgd":
            return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum)
        if cfg.optimizer == "rmsprop":
            return torch.optim.RMSprop(params, lr=cfg.lr, alpha=cfg.rmsprop_alpha, momentum=cfg.momentum)
        raise ValueError(f"optimizer must be adam, sgd or rmsprop, got {cfg.optimizer!r}")

    @property
    def net(self) -> nn.Module:
        return self.ddp if self.ddp is not None else self.model

    # --- one training step ---
    def train_step(self, batch) -> dict:
        cfg = self.cfg
        self.model.train()
        if self.weight_noise is not None:
            self.weight_noise.add()
        kind = self.data.kind
        initial = None
        if kind == "lm":
            x, y = (t.to(self.device) for t in batch)
            if self.state is not None:
                # Truncated BPTT: carry the state over, cut the graph.
                self.state = [tuple(s.detach() for s in layer) for layer in self.state]
                initial = [layer[0] for layer in self.state]
            logits, self.state, sequences = self.net(x, self.state)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
            correct = None
        elif kind == "classify":
            x, y = (t.to(self.device) for t in batch)
            logits, sequences = self.net(x)
            loss = F.cross_entropy(logits, y)
            correct = (logits.argmax(-1) == y).float().mean().item()
        else:
            x, y = (t.to(self.device) for t in batch)
            logits, sequences = self.net(x)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
            correct = (logits.argmax(-1) == y).float().mean().item()
        objective = loss
        if kind == "lm" and cfg.loss_reduction == "sum-over-time":
            objective = loss * y.shape[0]
        elif cfg.loss_reduction not in ("mean", "sum-over-time"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum-over-time', got {cfg.loss_reduction!r}")
        if cfg.regularizer == "norm-stabilizer" and cfg.norm_stabilizer_beta > 0:
            objective = loss + cfg.norm_stabilizer_beta * norm_stabilizer_penalty(sequences, initial)
        self.optimizer.zero_grad(set_to_none=True)
        objective.backward()
        if self.weight_noise is not None:
            self.weight_noise.remove()
        if cfg.clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip)
        self.optimizer.step()
        self.step += 1
        return {"loss": loss.item(), "accuracy": correct}

    def train_metric(self, loss: float, accuracy) -> float:
        if self.data.kind == "lm":
            return metric_from_nats(self.cfg.task, loss)
        return 1.0 - accuracy

    # --- evaluation ---
    @torch.no_grad()
    def evaluate(self, split: str, model: Optional[nn.Module] = None) -> dict:
        cfg, model = self.cfg, model or self.model
        was_training = model.training
        model.eval()
        limit = cfg.eval_batches or None
        total_loss, total_count, errors = 0.0, 0, 0
        try:
            if self.data.kind == "lm":
                stream, state = self.data.eval_streams[split], None
                for index, x, y in D.lm_batches(stream, cfg.seq_len):
                    if limit and index >= limit:
                        break
                    logits, state, _ = model(x.to(self.device), state)
                    total_loss += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.to(self.device).reshape(-1),
                                                  reduction="sum").item()
                    total_count += y.numel()
                nats = total_loss / total_count
                return {"loss": nats, self.metric: metric_from_nats(cfg.task, nats)}
            if self.data.kind == "classify":
                x_all, y_all = getattr(self.data.images, split)
                chunk = max(cfg.batch_size, 256)
                for index, i in enumerate(range(0, x_all.shape[0], chunk)):
                    if limit and index >= limit:
                        break
                    x, y = x_all[i:i + chunk].t().unsqueeze(-1).to(self.device), y_all[i:i + chunk].to(self.device)
                    logits, _ = model(x)
                    total_loss += F.cross_entropy(logits, y, reduction="sum").item()
                    errors += (logits.argmax(-1) != y).sum().item()
                    total_count += y.numel()
            else:
                tokens, targets = self.data.eval_sets[split]
                for index, i in enumerate(range(0, tokens.shape[1], 256)):
                    if limit and index >= limit:
                        break
                    x, y = tokens[:, i:i + 256].to(self.device), targets[:, i:i + 256].to(self.device)
                    logits, _ = model(x)
                    total_loss += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                                  reduction="sum").item()
                    errors += (logits.argmax(-1) != y).sum().item()
                    total_count += y.numel()
            return {"loss": total_loss / total_count, "error": errors / total_count}
        finally:
            model.train(was_training)

    # --- checkpoints ---
    def checkpoint_state(self) -> dict:
        return {
            "config": dataclasses.asdict(self.cfg),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch, "step": self.step,
            "best": self.best, "bad_evals": self.bad_evals, "best_state": self.best_state,
            "history": self.history, "elapsed": self.elapsed,
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
        }

    def save_checkpoint(self) -> None:
        if not self.is_main:
            return
        self.checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.checkpoint_path.with_name(self.checkpoint_path.name + ".tmp")
        torch.save(self.checkpoint_state(), tmp)
        os.replace(tmp, self.checkpoint_path)  # never leave a half-written checkpoint

    def load_checkpoint(self) -> None:
        path = self.checkpoint_path
        if not path.is_file():
            raise FileNotFoundError(f"--resume: no checkpoint at {path} (give its path with --checkpoint)")
        ckpt = torch.load(path, map_location=self.device, weights_only=False)
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.epoch, self.batch_in_epoch, self.step = ckpt["epoch"], ckpt["batch_in_epoch"], ckpt["step"]
        self.best, self.bad_evals, self.best_state = ckpt["best"], ckpt["bad_evals"], ckpt["best_state"]
        self.history, self.elapsed = ckpt["history"], ckpt["elapsed"]
        rng = ckpt["rng"]
        if self.world == 1:  # other ranks keep their own seed + rank streams
            torch.set_rng_state(rng["torch"])
            random.setstate(rng["python"])
            if rng.get("cuda") is not None and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
        if self.is_main:
            print(f"resumed from {path}: epoch {self.epoch}, step {self.step}", flush=True)

    # --- logs ---
    def record(self, row: dict) -> None:
        self.history.append(row)
        if self.is_main:
            self.write_logs()

    def write_logs(self, final: Optional[dict] = None) -> None:
        keys = ["step", "epoch", "split", "loss", self.metric, "lr", "elapsed_s"]
        with open(self.out_dir / "log.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=keys, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(self.history)
        summary = {"config": dataclasses.asdict(self.cfg), "metric": self.metric, "history": self.history}
        if final is not None:
            summary["final"] = final
        with open(self.out_dir / "log.json", "w") as handle:
            json.dump(summary, handle, indent=1)

    def plot(self) -> Optional[Path]:
        if not (self.is_main and self.cfg.plot):
            return None
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            print("matplotlib is not installed: no learning-curve PNG (pip install matplotlib)", flush=True)
            return None
        fig, ax = plt.subplots(figsize=(6, 4))
        for split, style in (("train", "-"), ("valid", "--")):
            rows = [r for r in self.history if r["split"] == split]
            if rows:
                ax.plot([r["step"] for r in rows], [r[self.metric] for r in rows], style, label=split)
        ax.set_xlabel("training step")
        ax.set_ylabel(self.metric)
        ax.set_title(f"{self.cfg.task}, {self.cfg.regularizer}")
        ax.grid(alpha=0.3)
        ax.legend()
        path = self.out_dir / "curves.png"
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    # --- the loop ---
    def log(self, message: str) -> None:
        if self.is_main:
            (tqdm.write if tqdm is not None else print)(message)

    def evaluate_and_maybe_stop(self, train_stats: dict) -> bool:
        """Records train and validation numbers; returns True when early stopping fires."""
        lr = self.optimizer.param_groups[0]["lr"]
        base = {"step": self.step, "epoch": self.epoch, "lr": lr, "elapsed_s": round(self.elapsed, 2)}
        if train_stats["count"]:
            loss = train_stats["loss"] / train_stats["count"]
            acc = train_stats["accuracy"] / train_stats["count"] if train_stats["has_accuracy"] else None
            self.record({**base, "split": "train", "loss": loss, self.metric: self.train_metric(loss, acc)})
        valid = self.evaluate("valid")
        self.record({**base, "split": "valid", **valid})
        value = valid[self.metric]
        improved = value < self.best
        if improved:
            self.best, self.bad_evals = value, 0
            self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        else:
            self.bad_evals += 1
        self.log(f"epoch {self.epoch} step {self.step}: valid {self.metric} {value:.4f} (loss {valid['loss']:.4f})"
                 f"{' *' if improved else ''}")
        return self.cfg.patience > 0 and self.bad_evals >= self.cfg.patience

    def fit(self) -> dict:
        cfg = self.cfg
        steps_per_epoch = self.data.steps_in_epoch()
        stop = False
        total_steps = cfg.epochs * steps_per_epoch
        if cfg.max_steps:
            total_steps = min(total_steps, cfg.max_steps)
        bar = None
        if tqdm is not None and self.is_main and cfg.progress:
            bar = tqdm(total=total_steps, initial=min(self.step, total_steps), unit="step", dynamic_ncols=True)
        if cfg.max_steps and self.step >= cfg.max_steps:
            stop = True
        while not stop and self.epoch <= cfg.epochs:
            stats = {"loss": 0.0, "accuracy": 0.0, "count": 0, "has_accuracy": False}
            if self.batch_in_epoch == 0:
                self.state = None
            started = time.perf_counter()
            for index, batch in self.data.train_batches(self.epoch, self.batch_in_epoch):
                out = self.train_step(batch)
                self.batch_in_epoch = index + 1
                if not math.isfinite(out["loss"]):
                    raise FloatingPointError(f"training loss became {out['loss']} at step {self.step}: "
                                             "lower --lr or set --clip")
                stats["loss"] += out["loss"]
                stats["count"] += 1
                if out["accuracy"] is not None:
                    stats["accuracy"] += out["accuracy"]
                    stats["has_accuracy"] = True
                if bar is not None:
                    bar.update(1)
                    if self.step % max(1, cfg.log_every) == 0:
                        bar.set_postfix(epoch=self.epoch, loss=f"{out['loss']:.3f}")
                at_limit = bool(cfg.max_steps) and self.step >= cfg.max_steps
                mid_eval = cfg.eval_every and self.step % cfg.eval_every == 0 and self.batch_in_epoch < steps_per_epoch
                if mid_eval or at_limit:
                    self.elapsed += time.perf_counter() - started
                    started = time.perf_counter()
                    stop = self.evaluate_and_maybe_stop(stats)
                    self.save_checkpoint()
                    stats = {"loss": 0.0, "accuracy": 0.0, "count": 0, "has_accuracy": False}
                    if at_limit:
                        stop = True
                    if stop:
                        break
            if stop:
                break
            self.elapsed += time.perf_counter() - started
            stop = self.evaluate_and_maybe_stop(stats)
            # Next epoch's position and lr before saving, so a resumed run starts after this epoch.
            self.epoch += 1
            self.batch_in_epoch = 0
            self.scheduler.step()
            self.save_checkpoint()
        if bar is not None:
            bar.close()
        return self.finish()

    def finish(self) -> dict:
        """Evaluates the best model (by validation) on valid and test; writes logs and the plot."""
        model = self.model
        if self.best_state is not None:
            model = self.data.make_model().to(self.device)
            model.load_state_dict(self.best_state)
        final = {"metric": self.metric, "steps": self.step, "train_time_s": round(self.elapsed, 2),
                 "valid": self.evaluate("valid", model), "test": self.evaluate("test", model)}
        if self.data.kind == "copy":
            final["chance"] = {"loss": math.log(self.cfg.copy_symbols), "error": 1 - 1 / self.cfg.copy_symbols}
        if self.is_main:
            self.write_logs(final)
            png = self.plot()
            final["files"] = {"csv": str(self.out_dir / "log.csv"), "json": str(self.out_dir / "log.json"),
                              "png": str(png) if png else None, "checkpoint": str(self.checkpoint_path)}
        return final

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()
