import builtins
import json
import sys

import numpy as np
import pytest
import torch

from grpo_utils.train.metrics import (
    MetricsLogger,
    format_summary,
    plot_reward_curve,
    read_metrics,
    write_summary,
)


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_log_lines_content_and_types(tmp_path):
    with MetricsLogger(tmp_path, total_steps=3, progress=True) as lg:
        lg.log(
            {
                "reward/mean": torch.tensor(0.5),
                "reward/std": np.float32(0.25),
                "loss": torch.tensor([1.5], dtype=torch.bfloat16),
                "kl": np.float64(0.125),
                "num_samples": 8,
                "lr": 1e-5,
            },
            step=1,
        )
        lg.log({"reward/mean": 0.75, "loss": 1.0}, step=2)
        lg.log_eval({"eval/accuracy": torch.tensor(0.4), "n": 10}, step=2)
    recs = _lines(tmp_path / "metrics.jsonl")
    assert len(recs) == 3
    first = recs[0]
    assert list(first)[0] == "step" and list(first)[-1] == "time"
    assert first["step"] == 1
    assert first["reward/mean"] == 0.5 and type(first["reward/mean"]) is float
    assert first["reward/std"] == 0.25 and type(first["reward/std"]) is float
    assert first["loss"] == 1.5 and type(first["loss"]) is float
    assert first["kl"] == 0.125
    assert first["num_samples"] == 8 and type(first["num_samples"]) is int
    assert first["lr"] == 1e-5
    assert isinstance(first["time"], float) and 0 <= first["time"] < 60
    assert recs[1] == {"step": 2, "reward/mean": 0.75, "loss": 1.0, "time": recs[1]["time"]}
    ev = recs[2]
    assert ev["step"] == 2
    assert ev["eval/accuracy"] == pytest.approx(0.4) and type(ev["eval/accuracy"]) is float
    assert ev["eval/n"] == 10  # missing prefix is added
    assert read_metrics(tmp_path) == recs
    assert read_metrics(tmp_path / "metrics.jsonl") == recs


def test_log_flushes_each_line_and_close_is_idempotent(tmp_path):
    lg = MetricsLogger(tmp_path, progress=False)
    lg.log({"reward/mean": 1.0}, step=1)
    assert len(_lines(tmp_path / "metrics.jsonl")) == 1  # visible before close
    lg.close()
    lg.close()
    with pytest.raises(RuntimeError):
        lg.log({"reward/mean": 1.0}, step=2)


def test_progress_bar_tracks_step_and_postfix(tmp_path):
    lg = MetricsLogger(tmp_path, total_steps=10, start_step=0, progress=True)
    lg.log({"reward/mean": 0.123456, "loss": 2.5}, step=4)
    lg.log_eval({"eval/accuracy": 0.9}, step=4)
    assert lg._bar.n == 4
    assert lg._bar.postfix is not None
    assert "reward=0.123" in lg._bar.postfix and "loss=2.5" in lg._bar.postfix
    lg.close()


def test_resume_truncates_and_backs_up(tmp_path):
    with MetricsLogger(tmp_path, progress=False) as lg:
        lg.log({"reward/mean": 0.1}, step=1)
        lg.log({"reward/mean": 0.2}, step=2)
        lg.log_eval({"eval/accuracy": 0.3}, step=2)
        lg.log({"reward/mean": 0.4}, step=3)
        lg.log({"reward/mean": 0.5}, step=4)
    path = tmp_path / "metrics.jsonl"
    with open(path, "a") as f:
        f.write('{"note": "no step"}\n{"step": 5, "reward/me')  # torn last line from a crash
    original = path.read_text()

    with MetricsLogger(tmp_path, start_step=2, total_steps=6, progress=True) as lg:
        assert lg._bar.n == 2
        lg.log({"reward/mean": 0.45}, step=3)
    backup = tmp_path / "metrics.pre_resume_step_2.jsonl"
    assert backup.read_text() == original
    recs = _lines(path)
    assert [(r.get("step"), r.get("reward/mean"), r.get("eval/accuracy")) for r in recs] == [
        (1, 0.1, None),
        (2, 0.2, None),
        (2, None, 0.3),
        (None, None, None),
        (3, 0.45, None),
    ]

    # resuming again from the same step keeps the first backup and writes a new one
    with MetricsLogger(tmp_path, start_step=2, progress=False):
        pass
    assert backup.read_text() == original
    assert (tmp_path / "metrics.pre_resume_step_2.1.jsonl").is_file()
    assert [r.get("step") for r in _lines(path)] == [1, 2, 2, None]


def test_fresh_start_moves_old_file_aside(tmp_path):
    with MetricsLogger(tmp_path, progress=False) as lg:
        lg.log({"reward/mean": 0.1}, step=1)
    with MetricsLogger(tmp_path, progress=False) as lg:
        lg.log({"reward/mean": 0.9}, step=1)
    assert [r["reward/mean"] for r in _lines(tmp_path / "metrics.jsonl")] == [0.9]
    assert _lines(tmp_path / "metrics.pre_resume_step_0.jsonl")[0]["reward/mean"] == 0.1


def _write_run(tmp_path):
    with MetricsLogger(tmp_path, progress=False) as lg:
        lg.log({"reward/mean": 0.2, "reward/std": 0.1, "loss": 1.0, "tag": "a"}, step=1)
        lg.log_eval({"eval/accuracy": 0.30, "eval/loss": 2.0}, step=1)
        lg.log({"reward/mean": 0.6, "reward/std": 0.2, "loss": 0.7}, step=2)
        lg.log({"reward/mean": 0.5, "reward/std": 0.1, "loss": 0.4}, step=3)
        lg.log_eval({"eval/accuracy": 0.45, "eval/loss": 1.5}, step=3)
        lg.log({"reward/mean": 0.4, "reward/std": 0.3, "loss": 0.8}, step=4)


def test_summary_best_and_final(tmp_path):
    _write_run(tmp_path)
    s = write_summary(
        tmp_path,
        steps_done=4,
        wall_time_s=12.5,
        extra={"heldout_accuracy_before": 0.25, "heldout_accuracy_after": 0.5},
    )
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == s
    assert not list(tmp_path.glob("*.tmp"))
    assert s["steps_done"] == 4 and s["wall_time_s"] == 12.5
    assert s["final"]["step"] == 4
    assert s["final"]["reward/mean"] == 0.4
    assert s["final"]["loss"] == 0.8
    assert "tag" not in s["final"]
    assert s["best"]["reward/mean"] == 0.6
    assert s["best"]["loss"] == 0.4
    assert s["best"]["eval/accuracy"] == 0.45
    assert s["best"]["eval/loss"] == 1.5  # losses are minimised, eval ones too
    assert s["best_step"]["reward/mean"] == 2 and s["best_step"]["eval/accuracy"] == 3
    assert s["heldout_accuracy_before"] == 0.25 and s["heldout_accuracy_after"] == 0.5

    text = format_summary(s)
    assert "steps done: 4" in text
    assert "12.5s" in text
    assert "final 0.4" in text and "best 0.6" in text
    assert "0.25 -> 0.5" in text
    assert len(text.splitlines()) >= 4


def test_summary_with_explicit_metrics_path_and_no_lines(tmp_path):
    _write_run(tmp_path / "a")
    s = write_summary(tmp_path / "b", steps_done=0, wall_time_s=1.0,
                      metrics_path=tmp_path / "a" / "metrics.jsonl")
    assert s["best"]["reward/mean"] == 0.6
    empty = write_summary(tmp_path / "c", steps_done=0, wall_time_s=0.0)
    assert empty["final"] == {} and empty["best"] == {}
    assert "steps done: 0" in format_summary(empty)


def test_plot_writes_png(tmp_path):
    _write_run(tmp_path)
    out = plot_reward_curve(tmp_path)
    assert out == tmp_path / "reward_curve.png"
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 1000
    assert plot_reward_curve(tmp_path / "empty") is None


def test_unknown_backend_is_rejected(tmp_path):
    with pytest.raises(ValueError) as ei:
        MetricsLogger(tmp_path, backend="tensorboard", progress=False)
    msg = str(ei.value)
    assert "logger" in msg and "none" in msg and "wandb" in msg


def test_wandb_missing_gives_clear_error(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "wandb" or name.startswith("wandb."):
            raise ImportError("No module named 'wandb'")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "wandb", raising=False)
    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=r"logger=wandb needs the wandb package: pip install wandb"):
        MetricsLogger(tmp_path, backend="wandb", progress=False)


def test_wandb_backend_forwards_metrics(tmp_path, monkeypatch):
    calls = {}

    class FakeRun:
        def __init__(self):
            self.logged = []
            self.finished = False

        def log(self, data, step):
            self.logged.append((step, data))

        def finish(self):
            self.finished = True

    class FakeWandb:
        @staticmethod
        def init(**kw):
            calls["init"] = kw
            calls["run"] = FakeRun()
            return calls["run"]

    monkeypatch.setitem(sys.modules, "wandb", FakeWandb)
    monkeypatch.setenv("WANDB_MODE", "offline")
    with MetricsLogger(tmp_path, backend="wandb", project="p", run_name="r",
                       config={"lr": np.float32(0.5)}, progress=False) as lg:
        lg.log({"reward/mean": torch.tensor(0.25)}, step=3)
        lg.log_eval({"eval/accuracy": 0.5}, step=3)
    kw = calls["init"]
    assert kw["project"] == "p" and kw["name"] == "r" and kw["mode"] == "offline"
    assert kw["config"] == {"lr": 0.5}
    run = calls["run"]
    assert run.logged[0][0] == 3 and run.logged[0][1]["reward/mean"] == 0.25
    assert run.logged[1][1]["eval/accuracy"] == 0.5
    assert run.finished


def _failing_write(monkeypatch, error: BaseException, when: bytes):
    """os.write that writes half of a line containing ``when``, then raises ``error`` (once)."""
    import os

    real = os.write
    state = {"done": False}

    def write(fd, data):
        if when in bytes(data) and not state["done"]:
            state["done"] = True
            real(fd, bytes(data[: len(data) // 2]))
            raise error
        return real(fd, data)

    monkeypatch.setattr(os, "write", write)


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), KeyboardInterrupt()],
                         ids=["disk-full", "ctrl-c"])
def test_a_failed_write_is_cut_back_to_the_last_complete_line(tmp_path, monkeypatch, error):
    path = tmp_path / "metrics.jsonl"
    lg = MetricsLogger(tmp_path, progress=False)
    lg.log({"reward/mean": 0.1}, step=1)
    before = path.read_text()
    _failing_write(monkeypatch, error, b'"step": 2')
    with pytest.raises(type(error)) as ei:
        lg.log({"reward/mean": 0.2, "pad": "x" * 500}, step=2)
    if isinstance(error, OSError):
        assert ei.value.errno == 28 and ei.value.filename == str(path)  # names the file for the one-line error
    assert path.read_text() == before  # no partial line
    lg.log({"reward/mean": 0.3}, step=3)  # the disk has room again
    lg.close()
    assert [r["step"] for r in _lines(path)] == [1, 3]


def test_resume_repairs_the_file_and_knows_the_logged_evaluations(tmp_path):
    with MetricsLogger(tmp_path, progress=False) as lg:
        lg.log({"reward/mean": 0.1}, step=1)
        lg.log_eval({"eval/accuracy": 0.3}, step=2)
        assert lg.logged_eval(2) == {"eval/accuracy": 0.3} and lg.logged_eval(1) is None
        lg.log_eval({"eval/accuracy": 0.4}, step=3)
    path = tmp_path / "metrics.jsonl"
    with open(path, "a") as f:
        f.write('{"step": 4, "reward/me')  # torn by a kill
    with MetricsLogger(tmp_path, start_step=3, progress=False) as lg:
        assert lg.logged_eval(3) == {"eval/accuracy": 0.4} and lg.logged_eval(2) == {"eval/accuracy": 0.3}
        assert lg.logged_eval(4) is None
        assert path.read_text().endswith("}\n")  # the torn line is gone from the file itself
        lg.log({"reward/mean": 0.5}, step=4)
    assert [r["step"] for r in _lines(path)] == [1, 2, 3, 4]
    with MetricsLogger(tmp_path, start_step=2, progress=False) as lg:
        assert lg.logged_eval(3) is None and lg.logged_eval(2) == {"eval/accuracy": 0.3}


def test_a_failed_summary_or_resume_rewrite_leaves_nothing_partial(tmp_path, monkeypatch):
    import os

    _write_run(tmp_path)
    original = (tmp_path / "metrics.jsonl").read_text()
    real_fsync = os.fsync

    def fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError) as ei:
        write_summary(tmp_path, steps_done=4, wall_time_s=1.0)
    assert ei.value.errno == 28 and ei.value.filename == str(tmp_path / "summary.json")
    with pytest.raises(OSError) as ei:
        MetricsLogger(tmp_path, start_step=2, progress=False)
    assert ei.value.filename == str(tmp_path / "metrics.jsonl")
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # no summary, backup or .tmp
    assert (tmp_path / "metrics.jsonl").read_text() == original
