"""Training programs (zoneout_fused.train): tiny models, a few steps, no network."""
import csv
import gzip
import json
import os
import socket
import struct

import pytest
import torch

os.environ["ZONEOUT_FUSED_OFFLINE"] = "1"  # no code path here may download

from zoneout_fused.train import data as D  # noqa: E402
from zoneout_fused.train import cli, gradient_flow, loop, tasks  # noqa: E402

TINY_COPY = ["--hidden-size", "8", "--embed-size", "4", "--batch-size", "4", "--copy-length", "2",
             "--copy-delay", "2", "--copy-symbols", "4", "--eval-examples", "16", "--steps-per-epoch", "3",
             "--epochs", "2", "--no-progress", "--no-plot", "--backend", "reference", "--threads", "1"]


pytestmark = pytest.mark.usefixtures("offline_data")


def run(argv):
    return cli.main([str(a) for a in argv])


def test_default_task_is_the_builtin_copy_task():
    cfg = cli.resolve_config(cli.build_parser().parse_args([]))
    assert cfg.task == "copy" and cfg.regularizer == "zoneout"


def test_copy_task_writes_logs_and_plot(tmp_path):
    argv = TINY_COPY[:]
    argv.remove("--no-plot")
    final = run(argv + ["--out-dir", tmp_path])
    assert final["steps"] == 6
    for split in ("valid", "test"):
        assert 0.0 <= final[split]["error"] <= 1.0 and final[split]["loss"] > 0
    rows = list(csv.DictReader(open(tmp_path / "log.csv")))
    assert [r["split"] for r in rows] == ["train", "valid"] * 2
    summary = json.load(open(tmp_path / "log.json"))
    assert summary["config"]["task"] == "copy" and "final" in summary
    assert (tmp_path / "curves.png").stat().st_size > 0
    assert (tmp_path / "checkpoint.pt").is_file()


def test_copy_batch_layout():
    tokens, targets = tasks.make_copy_batch(3, symbols=5, length=2, delay=4)
    assert tokens.shape == (8, 3) and targets.shape == (2, 3)
    assert torch.equal(tokens[:2], targets + 1)
    assert (tokens[5] == 6).all() and (tokens[2:5] == 0).all() and (tokens[6:] == 0).all()


def test_presets_and_overrides():
    parse = cli.build_parser().parse_args
    char = cli.resolve_config(parse(["--task", "char-ptb"]))
    assert (char.hidden_size, char.layers, char.lr, char.batch_size, char.seq_len, char.clip) == (1000, 1, 0.002, 32, 100, 1.0)
    assert (char.zoneout_cell, char.zoneout_hidden, char.optimizer) == (0.5, 0.05, "adam")
    word = cli.resolve_config(parse(["--task", "word-ptb"]))
    assert (word.hidden_size, word.layers, word.zoneout_cell, word.zoneout_hidden, word.optimizer) == (
        1500, 2, 0.25, 0.025, "sgd")
    assert word.dropout == 0.65 and word.lr_decay < 1 and word.loss_reduction == "sum-over-time"
    text8 = cli.resolve_config(parse(["--task", "text8"]))
    assert (text8.hidden_size, text8.batch_size, text8.seq_len) == (2000, 128, 180)
    pm = cli.resolve_config(parse(["--task", "pmnist"]))
    assert (pm.hidden_size, pm.optimizer, pm.lr, pm.rmsprop_alpha, pm.clip) == (100, "rmsprop", 0.001, 0.5, 1.0)
    assert tasks.lstm_kwargs(pm)["mask_mode"] == "shared" and pm.zoneout_cell == pm.zoneout_hidden == 0.15
    over = cli.resolve_config(parse(["--task", "char-ptb", "--hidden-size", "7", "--lr", "0.1", "--layers", "3",
                                     "--zoneout-cell", "0.2", "--seed", "5", "--max-steps", "9"]))
    assert (over.hidden_size, over.lr, over.layers, over.zoneout_cell, over.seed, over.max_steps) == (
        7, 0.1, 3, 0.2, 5, 9)
    assert over.batch_size == 32  # untouched values keep the preset


@pytest.mark.parametrize("reg, expected", [
    ("none", dict(zoneout_cell=0.0, zoneout_hidden=0.0, recurrent_dropout=0.0, mask_mode="independent")),
    ("zoneout", dict(zoneout_cell=0.5, zoneout_hidden=0.05, mask_mode="independent")),
    ("zoneout-shared", dict(zoneout_cell=0.5, zoneout_hidden=0.05, mask_mode="shared")),
    ("zoneout-static", dict(mask_mode="static")),
    ("stochastic-depth", dict(zoneout_cell=0.05, zoneout_hidden=0.05, mask_mode="timestep")),
    ("recurrent-dropout", dict(zoneout_cell=0.0, zoneout_hidden=0.0, recurrent_dropout=0.25)),
])
def test_regularizer_maps_to_module_options(reg, expected):
    cfg = tasks.Config(regularizer=reg, zoneout_cell=0.5, zoneout_hidden=0.05)
    kw = tasks.lstm_kwargs(cfg)
    for k, v in expected.items():
        assert kw[k] == v, k


@pytest.mark.parametrize("reg", tasks.REGULARIZERS)
def test_every_regularizer_trains(tmp_path, reg):
    final = run(TINY_COPY + ["--regularizer", reg, "--epochs", "1", "--steps-per-epoch", "2", "--out-dir", tmp_path])
    assert final["steps"] == 2 and final["test"]["loss"] == final["test"]["loss"]  # finite, not NaN


def test_weight_noise_is_removed_after_the_step():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    before = [p.detach().clone() for p in model.parameters()]
    noise = tasks.WeightNoise(model, sigma=0.5)
    noise.add()
    assert not torch.equal(model[0].weight, before[0])
    assert torch.equal(model[0].bias, before[1])  # only weight matrices get noise
    noise.remove()
    for p, b in zip(model.parameters(), before):
        torch.testing.assert_close(p, b)


def test_norm_stabilizer_penalty():
    h = torch.zeros(3, 1, 2)
    h[0, 0, 0], h[1, 0, 0], h[2, 0, 1] = 1.0, 3.0, 3.0  # norms 1, 3, 3
    assert tasks.norm_stabilizer_penalty([h]).item() == pytest.approx((4 + 0) / 2)
    h0 = torch.zeros(1, 2)  # norm 0 before the first step
    assert tasks.norm_stabilizer_penalty([h], [h0]).item() == pytest.approx((1 + 4 + 0) / 3)


def test_resume_continues_exactly(tmp_path):
    base = TINY_COPY + ["--epochs", "2", "--steps-per-epoch", "3"]
    straight = run(base + ["--out-dir", tmp_path / "a"])
    run(base + ["--out-dir", tmp_path / "b", "--max-steps", "4", "--checkpoint", tmp_path / "b.pt"])
    ckpt = torch.load(tmp_path / "b.pt", weights_only=False)
    assert (ckpt["epoch"], ckpt["batch_in_epoch"], ckpt["step"]) == (2, 1, 4)
    resumed = run(base + ["--out-dir", tmp_path / "b", "--checkpoint", tmp_path / "b.pt", "--resume"])
    assert resumed["steps"] == straight["steps"] == 6
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "b.pt", weights_only=False)
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0)
    for k in a["optimizer"]["state"]:
        torch.testing.assert_close(a["optimizer"]["state"][k]["exp_avg"], b["optimizer"]["state"][k]["exp_avg"])


def test_resume_without_checkpoint_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        run(TINY_COPY + ["--out-dir", tmp_path, "--resume"])


def test_early_stopping(tmp_path):
    final = run(TINY_COPY + ["--out-dir", tmp_path, "--lr", "0", "--patience", "1", "--epochs", "10"])
    assert final["steps"] == 6  # no improvement after the first evaluation: stops at the second


def test_lr_decay_schedule(tmp_path):
    run(TINY_COPY + ["--out-dir", tmp_path, "--optimizer", "sgd", "--lr", "1", "--lr-decay", "0.5",
                     "--lr-decay-start", "1", "--epochs", "3", "--steps-per-epoch", "1"])
    rows = [r for r in csv.DictReader(open(tmp_path / "log.csv")) if r["split"] == "valid"]
    assert [float(r["lr"]) for r in rows] == [1.0, 0.5, 0.25]


def _fake_ptb(directory, monkeypatch):
    monkeypatch.setattr(D, "md5_of", lambda path, uncompressed=False: D.PTB_MD5[path.name])
    directory.mkdir(exist_ok=True)
    words = "the cat sat on the mat and the dog ate the cat food".split()
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 60), ("valid", 20), ("test", 20)):
        lines = [" ".join(words[i] for i in torch.randint(0, len(words), (8,), generator=g)) for _ in range(n // 8 + 1)]
        (directory / f"ptb.{split}.txt").write_text("".join(f" {l} \n" for l in lines))
        (directory / f"ptb.char.{split}.txt").write_text(
            "".join(" ".join(l.replace(" ", "_")) + "\n" for l in lines))


LM_TINY = ["--hidden-size", "8", "--embed-size", "6", "--batch-size", "2", "--seq-len", "5", "--epochs", "1",
           "--max-steps", "3", "--no-progress", "--no-plot", "--backend", "reference", "--threads", "1"]


@pytest.mark.parametrize("task, metric", [("char-ptb", "bpc"), ("word-ptb", "perplexity")])
def test_ptb_tasks(tmp_path, monkeypatch, task, metric):
    _fake_ptb(tmp_path / "ptb", monkeypatch)
    extra = ["--layers", "2"] if task == "word-ptb" else []
    final = run(["--task", task, "--data-dir", tmp_path, "--out-dir", tmp_path / "out"] + LM_TINY + extra)
    assert final["metric"] == metric and final["steps"] == 3
    assert final["test"][metric] > 0 and final["valid"][metric] > 0
    if metric == "bpc":
        assert final["test"]["bpc"] == pytest.approx(final["test"]["loss"] / 0.6931471805599453)


@pytest.mark.parametrize("cell", ["gru", "rnn-tanh", "rnn-relu"])
def test_char_ptb_with_other_cells(tmp_path, monkeypatch, cell):
    """--cell: the LM carries its state across windows (truncated BPTT) with GRU / RNN layers too,
    on the fused CPU backend; char-ptb takes the paper's GRU / tanh-RNN settings."""
    _fake_ptb(tmp_path / "ptb", monkeypatch)
    argv = ["--task", "char-ptb", "--cell", cell, "--data-dir", tmp_path, "--out-dir", tmp_path / "out"] + LM_TINY
    argv[argv.index("reference")] = "auto"
    final = run(argv + ["--layers", "2"])
    assert final["steps"] == 3 and final["test"]["bpc"] > 0
    cfg = cli.resolve_config(cli.build_parser().parse_args(["--task", "char-ptb", "--cell", cell]))
    expected = {"gru": (0.001, 0.05), "rnn-tanh": (0.0003, 0.05), "rnn-relu": (0.002, 0.05)}[cell]
    assert (cfg.lr, cfg.zoneout_hidden) == expected
    model = tasks.LanguageModel(10, cfg.__class__(**{**cfg.__dict__, "hidden_size": 4, "embed_size": 3}))
    layer = model.rnn.layers[0]
    assert type(layer).__name__ == ("ZoneoutGRU" if cell == "gru" else "ZoneoutRNN")
    assert layer.zoneout_hidden == 0.05 and (cell == "gru" or layer.nonlinearity == cell[4:])


def test_cell_regularizer_combinations_are_checked():
    with pytest.raises(ValueError, match="cell lstm"):
        tasks.lstm_kwargs(tasks.Config(cell="gru", regularizer="zoneout-shared"))
    with pytest.raises(ValueError, match="gated cell"):
        tasks.lstm_kwargs(tasks.Config(cell="rnn-tanh", regularizer="recurrent-dropout"))
    kw = tasks.lstm_kwargs(tasks.Config(cell="gru", regularizer="recurrent-dropout", recurrent_dropout=0.2))
    assert kw["recurrent_dropout"] == 0.2 and "zoneout_cell" not in kw


def test_text8_task(tmp_path):
    (tmp_path / "text8.prefix").write_text(("the quick brown fox jumps over the lazy dog " * 60)[:2000])
    with pytest.warns(UserWarning):
        final = run(["--task", "text8", "--data-dir", tmp_path, "--out-dir", tmp_path / "out"] + LM_TINY)
    assert final["metric"] == "bpc" and final["test"]["bpc"] > 0


def test_pmnist_task(tmp_path, monkeypatch):
    g = torch.Generator().manual_seed(0)
    d = tmp_path / "mnist"
    d.mkdir()
    for name, shape in (("train-images-idx3-ubyte.gz", (20, 28, 28)), ("train-labels-idx1-ubyte.gz", (20,)),
                        ("t10k-images-idx3-ubyte.gz", (6, 28, 28)), ("t10k-labels-idx1-ubyte.gz", (6,))):
        arr = torch.randint(0, 10 if len(shape) == 1 else 256, shape, generator=g).to(torch.uint8)
        header = struct.pack(">HBB", 0, 8, len(shape)) + struct.pack(f">{len(shape)}I", *shape)
        with gzip.open(d / name, "wb") as handle:
            handle.write(header + arr.numpy().tobytes())
    monkeypatch.setattr(D, "md5_of", lambda path, uncompressed=False: D.MNIST_MD5[path.name][0])
    original = D.load_mnist
    monkeypatch.setattr(D, "load_mnist", lambda *a, **k: _small_mnist(original, *a, **k))
    final = run(["--task", "pmnist", "--data-dir", tmp_path, "--out-dir", tmp_path / "out", "--hidden-size", "4",
                 "--batch-size", "4", "--max-steps", "2", "--no-progress", "--no-plot", "--backend", "reference",
                 "--threads", "1"])
    assert final["metric"] == "error" and 0 <= final["test"]["error"] <= 1


def _small_mnist(load, *args, **kwargs):
    # 784-step sequences are slow on the reference backend: keep the first 16 pixels of each image.
    kwargs["valid_size"] = 4
    images = load(*args, **kwargs)
    cut = lambda split: (split[0][:, :16], split[1])  # noqa: E731
    return D.ImageData(cut(images.train), cut(images.valid), cut(images.test))



def test_missing_data_message_from_the_command_line(tmp_path):
    with pytest.raises(D.DataError) as info:
        run(["--task", "char-ptb", "--data-dir", tmp_path / "data", "--out-dir", tmp_path / "out"] + LM_TINY)
    assert "ptb.char.train.txt" in str(info.value) and str(tmp_path / "data") in str(info.value)
    assert not (tmp_path / "out").exists()


def test_gradient_flow_command(tmp_path):
    result = gradient_flow.main(["--steps", "6", "--hidden-size", "4", "--batch-size", "2", "--data", "random",
                                 "--out-dir", str(tmp_path), "--backend", "reference"])
    rows = list(csv.reader(open(tmp_path / "gradient_flow.csv")))
    assert len(rows) == 1 + 5 and len(rows[0]) == 4
    for curve in result["curves"].values():
        assert max(curve) == pytest.approx(1.0)
    assert (tmp_path / "gradient_flow.png").is_file()


def test_gradient_flow_via_task_flag(tmp_path):
    result = run(["--task", "gradient-flow", "--steps", "3", "--hidden-size", "2", "--batch-size", "1",
                  "--data", "random", "--out-dir", tmp_path])
    assert len(result["curves"]) == 3


# --- DistributedDataParallel: 2 CPU processes with gloo ------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, out_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), ZONEOUT_FUSED_OFFLINE="1")
    args = cli.build_parser().parse_args(TINY_COPY + ["--out-dir", out_dir, "--max-steps", "3", "--seed", "7"])
    cfg = cli.resolve_config(args)
    trainer = loop.Trainer(cfg)
    seed_at_start = torch.initial_seed()
    trainer.fit()
    torch.save({"model": trainer.model.state_dict(), "seed": seed_at_start, "steps": trainer.step},
               os.path.join(out_dir, f"rank{rank}.pt"))
    trainer.close()


def test_ddp_two_processes_stay_in_sync(tmp_path):
    import torch.multiprocessing as mp
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    assert r0["steps"] == r1["steps"] == 3
    assert (r0["seed"], r1["seed"]) == (7, 8)  # each rank its own mask stream
    for k in r0["model"]:
        torch.testing.assert_close(r0["model"][k], r1["model"][k], rtol=0, atol=0)
