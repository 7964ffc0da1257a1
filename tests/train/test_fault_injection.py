"""Fault injection: what a run does when its checkpoints are damaged or hostile, when the disk
fills up while it writes, and when it is killed (SIGKILL) at a random point.

Every case ends the same way: one line saying what is wrong, no partial file left behind, and a
resumed run equal to one that never met the fault (metrics lines but their timings, final weights).
The runs are in-process (GRPOLoop, as the recipes run it, behind the recipes' ``exit_on_error``)
except the kill -9 ones, which launch grpo-sync.py.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from grpo_utils.config.cli import compose_jobs
from grpo_utils.launch import exit_on_error
from grpo_utils.train import checkpoint as ckpt
from grpo_utils.train.loop import GRPOLoop
from tests.helpers import CONFIG, REPO, read_lines, recipe_command

pytestmark = pytest.mark.faults

# Six steps, two per rollout batch, a checkpoint every batch (step_2, step_4, step_6); an entropy
# bonus moves the random tiny model's weights although it earns no reward.
RUN = ["env.num_prompts=2", "env.group_size=4", "train.optim_batch_size=4", "train.grad_accum_steps=2",
       "generation.max_new_tokens=6", "eval.heldout_size=8", "train.max_steps=6", "checkpoint.every_n_steps=2",
       "checkpoint.keep_last=null", "seed=3", "loss.entropy_coef=0.5", "optimizer.lr=0.05", "num_threads=1"]
# Evaluations at steps 0 and 4 in the loop, and at step 6 in cleanup (after step_6 is written).
IN_PROCESS = [*RUN, "eval.every_n_steps=4"]
TIMINGS = {"time", "time/generate_s", "time/train_s", "tokens_per_s"}


def run_loop(tiny_dir: Path, run_dir: Path, *extra: str, args: list[str] = IN_PROCESS) -> None:
    """One run of the sync recipe's loop in this process (what grpo-sync.py runs, to the bit); a
    GRPOError exits as the recipe does (SystemExit carrying the one line)."""
    (cfg,) = compose_jobs([f"model.name={tiny_dir}", *args, *extra], CONFIG, "grpo_quickstart", "sync")
    with exit_on_error():
        loop = GRPOLoop(cfg, "sync", run_dir)
        loop.setup()
        loop.train()
        loop.cleanup()


def one_line_exit(excinfo) -> str:
    line = excinfo.value.code
    assert isinstance(line, str) and "\n" not in line, line
    return line


def stable(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in read_lines(run_dir / "metrics.jsonl")]


def kinds(lines: list[dict]) -> list[tuple[int, str]]:
    return [(r["step"], "eval" if any(k.startswith("eval/") for k in r) else "train") for r in lines]


def assert_unique_lines(run_dir: Path) -> None:
    seen = kinds(read_lines(run_dir / "metrics.jsonl"))
    assert len(seen) == len(set(seen)), seen


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


def assert_same_run(got: Path, ref: Path) -> None:
    """Bitwise: every metrics line but its timings, the last checkpoint's and final_model's weights."""
    assert stable(got) == stable(ref)
    assert_unique_lines(got)
    assert_same_weights(got / "checkpoints" / "step_6", ref / "checkpoints" / "step_6")
    assert_same_weights(got / "final_model", ref / "final_model")
    assert ckpt.verify_checkpoint(got / "final_model") is None


def leftovers(run_dir: Path) -> list[str]:
    return sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.name.startswith((".tmp", ".old"))
                  or p.name.endswith(".tmp"))


def rewrite_manifest(ckpt_dir: Path) -> None:
    """What someone who also rewrites the manifest would do: it then matches the files again."""
    files = {p.name: {"sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "size": p.stat().st_size}
             for p in ckpt_dir.iterdir() if p.is_file() and p.name != "manifest.json"}
    (ckpt_dir / "manifest.json").write_text(json.dumps({"format": 1, "files": files}))


class _RunsCode:
    """A pickled object whose unpickling would create ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def base(tiny_dir, tmp_path_factory) -> Path:
    """The uninterrupted run: checkpoints step_2, step_4, step_6, final_model, summary.json."""
    run_dir = tmp_path_factory.mktemp("faults") / "base"
    run_loop(tiny_dir, run_dir)
    return run_dir


@pytest.fixture(scope="module")
def from_step_4(base, tiny_dir, tmp_path_factory) -> Path:
    """The base run resumed explicitly from its step_4 checkpoint."""
    run_dir = tmp_path_factory.mktemp("faults") / "from_step_4"
    shutil.copytree(base, run_dir)
    run_loop(tiny_dir, run_dir, f"resume={run_dir / 'checkpoints' / 'step_4'}")
    return run_dir


def test_the_uninterrupted_run(base):
    assert kinds(read_lines(base / "metrics.jsonl")) == [
        (0, "eval"), (1, "train"), (2, "train"), (3, "train"), (4, "train"), (4, "eval"), (5, "train"), (6, "train"),
        (6, "eval")]
    for name in ("step_2", "step_4", "step_6"):
        assert ckpt.verify_checkpoint(base / "checkpoints" / name) is None
    assert leftovers(base) == []
    state = load_file(str(base / "checkpoints" / "step_4" / "model.safetensors"))
    assert any(not torch.equal(v, load_file(str(base / "final_model" / "model.safetensors"))[k])
               for k, v in state.items()), "the weights move"


# ------------------------------------------------------------------------------ damaged checkpoints


def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    for at in (len(data) // 2, len(data) // 2 + 7, len(data) - 3):
        data[at] ^= 0xA5
    path.write_bytes(bytes(data))


def halve(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def empty(path: Path) -> None:
    path.write_bytes(b"")


def hostile(path: Path) -> None:
    """A trainer_state.pt whose loading would run code, with a manifest that vouches for it."""
    torch.save({"step": 6, "trainer": _RunsCode(path.parent.parent.parent / "code_ran")}, path)
    rewrite_manifest(path.parent)


@pytest.mark.parametrize(("name", "damage", "problem"), [
    ("model.safetensors", flip, "model.safetensors: checksum mismatch"),
    ("trainer_state.pt", flip, "trainer_state.pt: checksum mismatch"),
    ("model.safetensors", halve, "model.safetensors: truncated ("),
    ("trainer_state.pt", empty, "trainer_state.pt: empty (expected "),
    ("trainer_state.pt", hostile, "trainer_state.pt: not plain checkpoint data, refused (loading it would run code"),
], ids=["flipped-weights", "flipped-state", "half-weights", "empty-state", "hostile-state"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(base, from_step_4, tiny_dir, tmp_path, capsys,
                                                                    name, damage, problem):
    run_dir = tmp_path / "run"
    shutil.copytree(base, run_dir)
    damage(run_dir / "checkpoints" / "step_6" / name)
    capsys.readouterr()
    run_loop(tiny_dir, run_dir, "resume=true")
    out = capsys.readouterr().out.splitlines()
    notes = [line for line in out if "is damaged" in line]
    assert len(notes) == 1, out
    assert notes[0].startswith(f"checkpoint checkpoints/step_6 is damaged ({problem}"), notes
    assert notes[0].endswith("; resuming from checkpoints/step_4"), notes
    assert any(line.startswith("Resumed from") and line.endswith("at step 4") for line in out), out
    assert not (run_dir / "code_ran").exists()
    assert_same_run(run_dir, from_step_4)


def test_an_explicitly_named_damaged_checkpoint_is_refused_in_one_line(base, tiny_dir, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(base, run_dir)
    hostile(run_dir / "checkpoints" / "step_6" / "trainer_state.pt")
    named = run_dir / "checkpoints" / "step_6"
    with pytest.raises(SystemExit) as excinfo:
        run_loop(tiny_dir, run_dir, f"resume={named}")
    line = one_line_exit(excinfo)
    assert line.startswith(f"error: resume={named}: checkpoint checkpoints/step_6 is damaged (trainer_state.pt: "
                           "not plain checkpoint data, refused"), line
    assert not (run_dir / "code_ran").exists()
    # and without the manifest's help: the checksum gives it away first
    flip(run_dir / "checkpoints" / "step_4" / "model.safetensors")
    with pytest.raises(SystemExit) as excinfo:
        run_loop(tiny_dir, run_dir, f"resume={run_dir / 'checkpoints' / 'step_4'}")
    assert one_line_exit(excinfo).endswith("is damaged (model.safetensors: checksum mismatch)")


def test_no_intact_checkpoint_stops_in_one_line(base, tiny_dir, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(base, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "step_2")
    halve(run_dir / "checkpoints" / "step_6" / "trainer_state.pt")
    (run_dir / "checkpoints" / "step_4" / "config.json").unlink()
    with pytest.raises(SystemExit) as excinfo:
        run_loop(tiny_dir, run_dir, "resume=true")
    line = one_line_exit(excinfo)
    assert line.startswith("error: resume=True: no intact checkpoint to resume from: checkpoint checkpoints/step_6 "
                           "is damaged (trainer_state.pt: truncated ("), line
    assert line.endswith(", checkpoint checkpoints/step_4 is damaged (config.json: missing)"), line


def test_a_resumed_finished_run_logs_nothing_twice(base, tiny_dir, tmp_path):
    """Killed after the final evaluation's line (here: after everything), resumed with resume=true:
    the run is at train.max_steps with step 6's evaluation logged, so nothing is evaluated or
    logged again, and the summary reports that evaluation."""
    run_dir = tmp_path / "run"
    shutil.copytree(base, run_dir)
    (run_dir / "summary.json").unlink()
    shutil.rmtree(run_dir / "final_model")
    run_loop(tiny_dir, run_dir, "resume=true")
    assert stable(run_dir) == stable(base)
    assert_unique_lines(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    final_eval = [r for r in read_lines(base / "metrics.jsonl") if r["step"] == 6 and "eval/accuracy" in r]
    assert summary["heldout_accuracy_after"] == final_eval[0]["eval/accuracy"]
    assert_same_weights(run_dir / "final_model", base / "final_model")
    assert ckpt.load_trainer_state(run_dir / "final_model")["step"] == 6


# -------------------------------------------------------------------------------------- full disk


class _Model(torch.nn.Module):
    """Stands in for a Hugging Face model: save_pretrained writes one safetensors file."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.arange(6.0))

    def save_pretrained(self, d):
        from safetensors.torch import save_file

        save_file({"w": self.w.detach()}, str(Path(d) / "model.safetensors"))


def _raiser(error: BaseException, partial: bool = True):
    def fail(obj, f, *args, **kwargs):
        if partial:
            Path(f).write_bytes(b"PK\x03\x04 partial")
        raise error
    return fail


@pytest.mark.parametrize(("target", "error", "free", "reason"), [
    ("torch.save", OSError(errno.ENOSPC, "No space left on device"), None, "no space left on device"),
    ("torch.save", OSError(errno.EDQUOT, "Disk quota exceeded"), None, "disk quota exceeded"),
    ("fsync", OSError(errno.EIO, "Input/output error"), None, "input/output error"),
    ("save_pretrained", "safetensors", None, "no space left on device"),
    ("torch.save", RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"), 0,
     "no space left on device"),
    ("torch.save", RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"), 1 << 40,
     "write error ([enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534)"),
], ids=["ENOSPC", "EDQUOT", "EIO", "safetensors-os-error-28", "torch-unexpected-pos-full", "torch-unexpected-pos"])
def test_a_failed_checkpoint_write_is_one_line_and_leaves_the_earlier_one(tmp_path, monkeypatch, target, error, free,
                                                                          reason):
    from safetensors import SafetensorError

    from grpo_utils.errors import CheckpointError

    model = _Model()
    ckpt.save_checkpoint(tmp_path, 2, model, None, {"step": 2})
    if target == "torch.save":
        monkeypatch.setattr(torch, "save", _raiser(error))
    elif target == "fsync":
        monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(error))
    else:
        message = "Error while serializing: I/O error: No space left on device (os error 28)"
        monkeypatch.setattr(model, "save_pretrained", lambda d: (_ for _ in ()).throw(SafetensorError(message)))
    if free is not None:
        monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1 << 41, 1 << 41, free))
    with pytest.raises(CheckpointError) as ei:
        ckpt.save_checkpoint(tmp_path, 4, model, None, {"step": 4})
    # the disk's failures name the file system to make room on (the free space of a shared disk varies)
    where = rf" \(mount {re.escape(str(ckpt._mount(tmp_path)[0]))}, {free >> 20 if free is not None else '[0-9]+'} MiB free\)"
    where = where if reason in ("no space left on device", "disk quota exceeded", "input/output error") else ""
    assert re.fullmatch(f"{re.escape(f'{reason} while writing {tmp_path}/checkpoints/step_4')}{where}; "
                        "checkpoints/step_2 is intact", str(ei.value)), str(ei.value)
    assert ei.value.one_line() == f"error: {ei.value}"
    monkeypatch.undo()
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_2"]  # no .tmp_step_4
    assert ckpt.verify_checkpoint(tmp_path / "checkpoints" / "step_2") is None
    assert ckpt.resume_point(True, tmp_path).path == tmp_path / "checkpoints" / "step_2"


def test_other_write_failures(tmp_path, monkeypatch):
    from grpo_utils.errors import CheckpointError

    model = _Model()
    monkeypatch.setattr(torch, "save", _raiser(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(CheckpointError, match=rf"^no space left on device while writing {re.escape(str(tmp_path))}/checkpoints/step_1 "
                                              rf"\(mount {re.escape(str(ckpt._mount(tmp_path)[0]))}, \d+ MiB free\); "
                                              r"no checkpoint was written before it$"):
        ckpt.save_checkpoint(tmp_path, 1, model, None, {"step": 1})
    monkeypatch.undo()
    step = ckpt.save_checkpoint(tmp_path, 1, model, None, {"step": 1})
    monkeypatch.setattr(shutil, "copy2", _raiser(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(CheckpointError, match=rf"^no space left on device while writing {re.escape(str(tmp_path))}/final_model "
                                              r"\(mount /\S*, \d+ MiB free\); "
                                              r"checkpoints/step_1 is intact$"):
        ckpt.save_final_model(tmp_path, model, None, checkpoint=step)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints"]
    # A bug is not the disk's fault: it keeps its type (and traceback).
    monkeypatch.setattr(torch, "save", _raiser(TypeError("cannot pickle 'generator' object"), partial=False))
    with pytest.raises(TypeError, match="cannot pickle"):
        ckpt.save_checkpoint(tmp_path, 2, model, None, {"step": 2})
    assert not (tmp_path / "checkpoints" / ".tmp_step_2").exists()
    # Errors met elsewhere: mapped when they name a file of the run, or carry a disk's errno.
    mapped = ckpt.write_error(OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "metrics.jsonl")),
                              tmp_path)
    assert str(mapped).startswith(f"no space left on device while writing {tmp_path}/metrics.jsonl (mount ")
    assert str(mapped).endswith(" MiB free); checkpoints/step_1 is intact")
    assert ckpt.write_error(OSError(errno.EACCES, "Permission denied", str(tmp_path / "summary.json")),
                            tmp_path).args[0].startswith(f"permission denied while writing {tmp_path}/summary.json; ")
    assert ckpt.write_error(ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"), tmp_path) is None
    assert ckpt.write_error(ValueError("bad value"), tmp_path) is None
    assert ckpt.write_error(KeyboardInterrupt(), tmp_path) is None



def test_a_full_disk_while_checkpointing_stops_in_one_line_and_resumes_exactly(base, tiny_dir, tmp_path, monkeypatch):
    """torch.save runs out of space writing step_4: one line, step_2 intact, no partial directory,
    no further checkpoint; once there is room, resume=true gives the uninterrupted run."""
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if ".tmp_step_4" in str(f):
            Path(f).write_bytes(b"PK\x03\x04partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    run_dir = tmp_path / "run"
    monkeypatch.setattr(torch, "save", save)
    with pytest.raises(SystemExit) as excinfo:
        run_loop(tiny_dir, run_dir)
    assert re.fullmatch(re.escape(f"error: no space left on device while writing {run_dir}/checkpoints/step_4 "
                                  f"(mount {ckpt._mount(run_dir)[0]}, ") + "[0-9]+ MiB free\\); checkpoints/step_2 is intact",
                        one_line_exit(excinfo))
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_2"]
    assert ckpt.verify_checkpoint(run_dir / "checkpoints" / "step_2") is None
    assert leftovers(run_dir) == []
    assert (run_dir / "metrics.jsonl").read_text().endswith("\n")

    monkeypatch.setattr(torch, "save", real_save)  # space freed
    run_loop(tiny_dir, run_dir, "resume=true")
    assert_same_run(run_dir, base)


def test_a_full_disk_while_logging_cuts_the_line_and_resumes_exactly(base, tiny_dir, tmp_path, monkeypatch):
    """The disk fills up in the middle of step 5's metrics line: the partial line is cut off, the
    run stops with one line naming step_4, and resumes from it exactly."""
    real_write = os.write
    calls = {"n": 0}

    def write(fd, data):
        if b'"step": 5,' in bytes(data[:12]) and calls["n"] == 0:
            calls["n"] += 1
            real_write(fd, bytes(data[: len(data) // 2]))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    run_dir = tmp_path / "run"
    monkeypatch.setattr(os, "write", write)
    with pytest.raises(SystemExit) as excinfo:
        run_loop(tiny_dir, run_dir)
    monkeypatch.setattr(os, "write", real_write)
    assert re.fullmatch(re.escape(f"error: no space left on device while writing {run_dir}/metrics.jsonl "
                                  f"(mount {ckpt._mount(run_dir)[0]}, ") + "[0-9]+ MiB free\\); checkpoints/step_4 is intact",
                        one_line_exit(excinfo))
    text = (run_dir / "metrics.jsonl").read_text()
    assert text.endswith("\n") and [r["step"] for r in read_lines(run_dir / "metrics.jsonl")][-1] == 4
    assert not (run_dir / "checkpoints" / "step_5").exists()
    run_loop(tiny_dir, run_dir, "resume=true")
    assert_same_run(run_dir, base)


@pytest.fixture
def small_disk(tmp_path):
    """A 640 KiB tmpfs (room for two of the tiny model's checkpoints, not three), unmounted after."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=640k", "tmpfs", str(mount)], capture_output=True,
                              text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"cannot mount a tmpfs here: {e}")
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {(proc.stderr or proc.stdout).strip()[:200]}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_a_real_full_disk(base, tiny_dir, small_disk):
    """The run directory on a small tmpfs: the first write that does not fit stops the run in
    one line; after the disk grows, resume=true continues exactly."""
    run_dir = small_disk / "run"
    with pytest.raises(SystemExit) as excinfo:
        run_loop(tiny_dir, run_dir)
    line = one_line_exit(excinfo)
    assert line.startswith(f"error: no space left on device while writing {run_dir}/"), line
    assert f" (mount {small_disk}, 0 MiB free); " in line, line  # which file system to make room on
    intact = line.rsplit("; ", 1)[1]
    assert intact.endswith(" is intact"), line
    assert (run_dir / intact.removesuffix(" is intact")).is_dir()
    assert leftovers(run_dir) == []
    for d in ckpt.list_checkpoints(run_dir):
        assert ckpt.verify_checkpoint(d) is None, d
    assert (run_dir / "metrics.jsonl").read_text().endswith("\n")

    subprocess.run(["mount", "-o", "remount,size=8m", str(small_disk)], check=True)
    run_loop(tiny_dir, run_dir, "resume=true")
    assert_same_run(run_dir, base)


# ------------------------------------------------------------------------------------- kill -9


KILL_RUN = [*RUN, "eval.every_n_steps=3"]  # evaluations at 0, 3 and 6 (the last one also cleanup's)
KILL_LINES = 9  # lines of an uninterrupted run: evals at 0, 3, 6 and steps 1..6


def _kill_when(proc: subprocess.Popen, metrics: Path, lines: int, delay: float) -> bool:
    """SIGKILL ``proc`` ``delay`` seconds after ``metrics`` holds ``lines`` lines; False if it ended first."""
    while proc.poll() is None:
        try:
            n = metrics.read_bytes().count(b"\n")
        except FileNotFoundError:
            n = 0
        if n >= lines:
            time.sleep(delay)
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                return True
            return False
        time.sleep(0.002)
    return False


@pytest.mark.slow
def test_kill_9_at_random_points_then_resume_gives_the_uninterrupted_run(env, tiny_dir, tmp_path):
    """Three runs of grpo-sync.py, each killed at a random point (after a random number of
    metrics lines, plus up to 60 ms: one early, one in the middle, one late, from the first
    evaluation to after the last line), resumed with resume=true: each equals a run never killed."""
    def start(run_dir: Path, *extra: str) -> subprocess.Popen:
        cmd = recipe_command(REPO / "sota-implementations" / "grpo" / "grpo-sync.py", f"model.name={tiny_dir}",
                             f"hydra.run.dir={run_dir}", *KILL_RUN, *extra)
        return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    ref = tmp_path / "ref"  # in this process: the recipe's loop gives the recipe's numbers
    run_loop(tiny_dir, ref, args=KILL_RUN)
    assert kinds(read_lines(ref / "metrics.jsonl")) == [
        (0, "eval"), (1, "train"), (2, "train"), (3, "train"), (3, "eval"), (4, "train"), (5, "train"), (6, "train"),
        (6, "eval")]
    procs = {}
    trials = {}
    for seed in (0, 1, 2):
        rng = random.Random(seed)
        third = KILL_LINES // 3
        trials[seed] = (tmp_path / f"killed_{seed}", rng.randint(seed * third + 1, (seed + 1) * third),
                        rng.uniform(0.0, 0.06))
        procs[seed] = start(trials[seed][0])
    killed: dict[int, bool] = {}
    watchers = [threading.Thread(target=lambda seed=seed, t=t: killed.__setitem__(
        seed, _kill_when(procs[seed], t[0] / "metrics.jsonl", t[1], t[2]))) for seed, t in trials.items()]
    for w in watchers:
        w.start()
    for w in watchers:
        w.join(timeout=600)
    for seed, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        if not killed[seed]:
            assert proc.returncode == 0, err[-3000:]
    assert any(killed.values()), trials

    resumed = {seed: start(run_dir, "resume=true") for seed, (run_dir, _, _) in trials.items()}
    for seed, proc in resumed.items():
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, (seed, trials[seed], err[-3000:])
    for seed, (run_dir, lines, delay) in trials.items():
        assert stable(run_dir) == stable(ref), (seed, lines, delay, killed[seed])
        assert_unique_lines(run_dir)
        assert_same_weights(run_dir / "final_model", ref / "final_model")
        assert_same_weights(run_dir / "checkpoints" / "step_6", ref / "checkpoints" / "step_6")
        assert leftovers(run_dir) == []
