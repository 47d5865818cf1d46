"""python -m zoneout_fused.train.compare: its commands, its resumable runner and its report (offline, seconds)."""
import json
import sys

import pytest

from zoneout_fused.train import cli, compare


def test_every_run_shares_the_scale_and_differs_in_the_regularizer():
    configs = {}
    for name in compare.RUNS:
        argv = compare.command(name, compare.DEFAULT_RUNS_DIR)
        assert argv[:3] == [sys.executable, "-m", "zoneout_fused.train"]
        configs[name] = cli.resolve_config(cli.build_parser().parse_args(argv[3:]))
    for cfg in configs.values():
        assert (cfg.task, cfg.hidden_size, cfg.layers, cfg.epochs, cfg.steps_per_epoch, cfg.seed, cfg.threads,
                cfg.dropout, cfg.optimizer, cfg.lr_decay) == ("word-ptb", 200, 2, 12, 150, 0, 1, 0.0, "sgd", 1.0)
    assert configs["none"].regularizer == "none"
    paper = configs["zoneout c0.5 h0.05"]
    assert (paper.regularizer, paper.zoneout_cell, paper.zoneout_hidden) == ("zoneout", 0.5, 0.05)
    assert configs["static zoneout c0.5 h0.05"].regularizer == "zoneout-static"
    assert (configs["recurrent dropout 0.25"].regularizer, configs["recurrent dropout 0.25"].recurrent_dropout) == (
        "recurrent-dropout", 0.25)
    assert len({cfg.out_dir for cfg in configs.values()}) == len(configs)


def _fake_log(out_dir, valid, train, final=True):
    out_dir.mkdir(parents=True, exist_ok=True)
    history = []
    for epoch, (v, t) in enumerate(zip(valid, train), start=1):
        history += [{"step": 10 * epoch, "epoch": epoch, "elapsed_s": 5.0 * epoch, "split": "train", "perplexity": t},
                    {"step": 10 * epoch, "epoch": epoch, "elapsed_s": 5.0 * epoch, "split": "valid", "perplexity": v}]
    log = {"config": {"backend": "auto"}, "metric": "perplexity", "history": history}
    if final:
        log["final"] = {"train_time_s": 5.0 * len(valid), "test": {"perplexity": min(valid) * 0.95}}
    (out_dir / "log.json").write_text(json.dumps(log))


def test_report_table_and_plot(tmp_path):
    runs = tmp_path / "runs"
    _fake_log(compare.run_dir(runs, "none"), valid=[300, 200, 250, 320], train=[400, 150, 90, 60])
    _fake_log(compare.run_dir(runs, "zoneout c0.5 h0.05"), valid=[320, 220, 180, 170], train=[450, 250, 200, 180],
              final=False)
    table = compare.report(["none", "zoneout c0.5 h0.05", "recurrent dropout 0.25"], runs, tmp_path / "out", "abc")
    lines = [line for line in table.splitlines() if line.startswith("| ") and "run |" not in line]
    # Best validation first: zoneout (170, unfinished: no test figure yet) before none (200 at epoch 2).
    assert lines[0].startswith("| zoneout c0.5 h0.05 (unfinished) | 170.0 | 4 | - |")
    assert lines[1].startswith("| none | 200.0 | 2 | 190.0 | 320.0 | 60.0 | 5 |")
    assert len(lines) == 2  # the run without a log is left out
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["commit"] == "abc" and [r["run"] for r in results["runs"]] == ["none", "zoneout c0.5 h0.05"]
    assert (tmp_path / "out" / "valid-curves.png").stat().st_size > 0
    assert (tmp_path / "out" / "table.md").read_text() == table


def test_runner_resumes_and_skips_finished_runs(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    _fake_log(compare.run_dir(runs, "none"), valid=[1], train=[1])  # finished: not run again
    interrupted = compare.run_dir(runs, "zoneout c0.5 h0.05")
    interrupted.mkdir(parents=True)
    (interrupted / "checkpoint.pt").write_bytes(b"")
    script = "import sys, pathlib; pathlib.Path(sys.argv[1]).joinpath('argv.txt').write_text(' '.join(sys.argv[2:]))"
    monkeypatch.setattr(compare, "command",
                        lambda name, runs_dir: [sys.executable, "-c", script, str(compare.run_dir(runs_dir, name)), name])
    assert compare.run_all(["none", "zoneout c0.5 h0.05", "recurrent dropout 0.25"], runs, jobs=2) == 0
    assert not (compare.run_dir(runs, "none") / "argv.txt").exists()
    assert (interrupted / "argv.txt").read_text() == "zoneout c0.5 h0.05 --resume"
    assert (compare.run_dir(runs, "recurrent dropout 0.25") / "argv.txt").read_text() == "recurrent dropout 0.25"


def test_unknown_run_is_rejected(capsys):
    with pytest.raises(SystemExit):
        compare.main(["commands", "--runs", "dropout everywhere"])
    assert "unknown" in capsys.readouterr().err
