import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config, Qwen2ForCausalLM

from grpo_utils.train.checkpoint import (
    capture_rng_state,
    latest_checkpoint,
    list_checkpoints,
    load_model_weights,
    load_trainer_state,
    resolve_resume,
    restore_rng_state,
    resume_point,
    save_checkpoint,
    save_final_model,
    verify_checkpoint,
)


def _config(**kw):
    base = dict(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    base.update(kw)
    return Qwen2Config(**base)


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(_config(**kw)).eval()


class StubTokenizer:
    def save_pretrained(self, d):
        Path(d, "tokenizer_stub.json").write_text(json.dumps({"stub": True}))


def _state(step):
    return {"step": step, "data_position": step * 4}


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_save_is_loadable_by_from_pretrained(tmp_path):
    model = _model()
    path = save_checkpoint(tmp_path, 3, model, StubTokenizer(), _state(3))
    assert path == tmp_path / "checkpoints" / "step_3"
    assert (path / "model.safetensors").is_file()
    assert (path / "config.json").is_file()
    assert (path / "tokenizer_stub.json").is_file()
    assert (path / "trainer_state.pt").is_file()
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "checkpoints").iterdir())

    loaded = AutoModelForCausalLM.from_pretrained(path).eval()
    assert type(loaded) is Qwen2ForCausalLM
    _same_weights(model, loaded)
    ids = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, loaded(ids).logits)


def test_save_unwraps_compiled_model_wrapper(tmp_path):
    class Wrapper(torch.nn.Module):  # stands in for torch.compile's OptimizedModule
        def __init__(self, m):
            super().__init__()
            self._orig_mod = m

    model = _model()
    path = save_checkpoint(tmp_path, 1, Wrapper(model), None, _state(1))
    _same_weights(model, AutoModelForCausalLM.from_pretrained(path))


def test_trainer_state_round_trip_with_optimizer(tmp_path):
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    for _ in range(2):
        loss = model(torch.tensor([[1, 2, 3, 4]]), labels=torch.tensor([[1, 2, 3, 4]])).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    caller_state = {
        "step": 2,
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "data_position": 17,
    }
    path = save_checkpoint(tmp_path, 2, model, StubTokenizer(), caller_state)
    assert "rng" not in caller_state  # caller's dict is not modified

    state = load_trainer_state(path)
    assert state["step"] == 2 and state["data_position"] == 17
    assert set(state["rng"]) >= {"python", "numpy", "torch"}
    assert state["scheduler"]["last_epoch"] == 2

    # A fresh model + optimizer restored from the checkpoint matches the original exactly.
    model2 = _model(seed=123)
    load_model_weights(path, model2)
    _same_weights(model, model2)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-3)
    opt2.load_state_dict(state["optimizer"])
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    assert s1["state"].keys() == s2["state"].keys()
    for i in s1["state"]:
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(s1["state"][i][k], s2["state"][i][k])
    # and the next optimizer step gives identical weights
    for m, o in ((model, opt), (model2, opt2)):
        m(torch.tensor([[4, 3, 2, 1]]), labels=torch.tensor([[4, 3, 2, 1]])).loss.backward()
        o.step()
    _same_weights(model, model2)


def test_load_model_weights_strict_and_sharded(tmp_path):
    model = _model()
    d = tmp_path / "sharded"
    model.save_pretrained(d, max_shard_size="2KB")
    assert (d / "model.safetensors.index.json").is_file()
    assert len(list(d.glob("model-*.safetensors"))) > 1
    other = _model(seed=9)
    load_model_weights(d, other)
    _same_weights(model, other)

    # tied embeddings: lm_head.weight is not in the file but must not count as missing
    tied = _model(seed=1, tie_word_embeddings=True)
    save_checkpoint(tmp_path / "tied", 1, tied, None, _state(1))
    tied2 = _model(seed=2, tie_word_embeddings=True)
    load_model_weights(tmp_path / "tied" / "checkpoints" / "step_1", tied2)
    _same_weights(tied, tied2)

    # a different architecture does not load silently
    wrong = _model(hidden_size=32, intermediate_size=64)
    with pytest.raises(RuntimeError):
        load_model_weights(d, wrong)
    # extra layers in the file (unexpected keys) are an error too
    deeper = tmp_path / "deeper"
    _model(num_hidden_layers=2).save_pretrained(deeper)
    with pytest.raises(RuntimeError, match="unexpected keys"):
        load_model_weights(deeper, _model())


def test_rng_capture_restore_reproduces_draws():
    state = capture_rng_state()
    a = (torch.rand(5), random.random(), np.random.rand(3))
    torch.rand(7), random.random(), np.random.rand(2)  # advance further
    restore_rng_state(state)
    b = (torch.rand(5), random.random(), np.random.rand(3))
    assert torch.equal(a[0], b[0])
    assert a[1] == b[1]
    assert np.array_equal(a[2], b[2])


def test_rng_state_survives_checkpoint(tmp_path):
    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    path = save_checkpoint(tmp_path, 1, _model(), None, _state(1))
    # seeding in _model() happens before save, so draws now continue from the saved state
    expected = (torch.rand(4), random.random(), np.random.rand(2))
    torch.manual_seed(99), random.seed(99), np.random.seed(99)
    restore_rng_state(load_trainer_state(path)["rng"])
    got = (torch.rand(4), random.random(), np.random.rand(2))
    assert torch.equal(expected[0], got[0])
    assert expected[1] == got[1]
    assert np.array_equal(expected[2], got[2])


def test_incomplete_and_temp_dirs_are_ignored(tmp_path):
    model = _model()
    save_checkpoint(tmp_path, 2, model, None, _state(2))
    ck = tmp_path / "checkpoints"
    # a crashed save: temp dir with full contents but never renamed
    (ck / ".tmp_step_9").mkdir()
    torch.save({"step": 9}, ck / ".tmp_step_9" / "trainer_state.pt")
    # a step dir that lacks trainer_state.pt (e.g. written by something else / half copied)
    (ck / "step_7").mkdir()
    (ck / "step_7" / "config.json").write_text("{}")
    (ck / "notes.txt").write_text("x")
    assert list_checkpoints(tmp_path) == [ck / "step_2"]
    assert latest_checkpoint(tmp_path) == ck / "step_2"
    assert resolve_resume(True, tmp_path) == ck / "step_2"

    # a failing save leaves no step dir and no temp dir behind
    class Boom:
        def save_pretrained(self, d):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, 5, model, Boom(), _state(5))
    assert not (ck / "step_5").exists()
    assert not (ck / ".tmp_step_5").exists()
    assert latest_checkpoint(tmp_path) == ck / "step_2"


def test_steps_sort_numerically_and_resave_replaces(tmp_path):
    model = _model()
    for s in (10, 2, 9):
        save_checkpoint(tmp_path, s, model, None, _state(s))
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_2", "step_9", "step_10"]
    save_checkpoint(tmp_path, 9, model, None, {"step": 9, "marker": "second"})
    assert load_trainer_state(tmp_path / "checkpoints" / "step_9")["marker"] == "second"
    assert [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")] == []


def test_keep_last_prunes_oldest(tmp_path):
    model = _model()
    for s in (1, 2, 3, 4):
        save_checkpoint(tmp_path, s, model, None, _state(s), keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_3", "step_4"]
    assert not (tmp_path / "checkpoints" / "step_1").exists()
    save_checkpoint(tmp_path, 5, model, None, _state(5), keep_last=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_5"]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_5"]
    with pytest.raises(ValueError):
        save_checkpoint(tmp_path, 6, model, None, _state(6), keep_last=0)


def test_resolve_resume(tmp_path):
    run = tmp_path / "run"
    assert resolve_resume(False, run) is None
    assert resolve_resume(None, run) is None
    assert resolve_resume(True, run) is None  # nothing yet: fresh start
    assert resolve_resume("latest", run) is None

    model = _model()
    save_checkpoint(run, 1, model, None, _state(1))
    p4 = save_checkpoint(run, 4, model, None, _state(4))
    p1 = run / "checkpoints" / "step_1"
    assert resolve_resume(True, run) == p4
    assert resolve_resume("latest", run) == p4
    assert resolve_resume(str(p1), tmp_path / "elsewhere") == p1
    assert resolve_resume(p1, tmp_path / "elsewhere") == p1
    assert resolve_resume(str(run), tmp_path / "elsewhere") == p4  # a run dir -> its latest

    bad = tmp_path / "nope" / "step_3"
    with pytest.raises(FileNotFoundError) as ei:
        resolve_resume(str(bad), run)
    msg = str(ei.value)
    assert str(bad) in msg and "trainer_state.pt" in msg and "\n" not in msg

    (run / "checkpoints" / "step_8").mkdir()  # exists but incomplete
    with pytest.raises(FileNotFoundError, match="step_8"):
        resolve_resume(str(run / "checkpoints" / "step_8"), run)


class _RunsCode:
    """What a hostile trainer_state.pt could hold: an object whose unpickling runs code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def test_trainer_state_loads_as_plain_data_only(tmp_path):
    from grpo_utils.errors import CheckpointError

    marker = tmp_path / "pwned"
    ckpt = tmp_path / "evil"
    ckpt.mkdir()
    torch.save({"step": 1, "trainer": _RunsCode(marker)}, ckpt / "trainer_state.pt")
    with pytest.raises(CheckpointError, match=r"not plain checkpoint data, refused \(loading it would run code"):
        load_trainer_state(ckpt)
    assert not marker.exists()


def test_checkpoint_with_a_numpy_rng_array_still_loads(tmp_path):
    """Checkpoints written before the numpy RNG state was stored as ints hold an ndarray."""
    np.random.seed(3)
    old = dict(capture_rng_state(), numpy=np.random.get_state())  # the earlier format
    expected = np.random.rand(3)
    ckpt = tmp_path / "old"
    ckpt.mkdir()
    torch.save({"step": 2, "rng": old}, ckpt / "trainer_state.pt")
    np.random.seed(99)
    restore_rng_state(load_trainer_state(ckpt)["rng"])
    assert np.array_equal(np.random.rand(3), expected)


# ------------------------------------------------------------------------------ manifest, verification


def _manifest(d: Path) -> dict:
    return json.loads((d / "manifest.json").read_text())["files"]


def test_manifest_lists_every_file_and_is_written_last(tmp_path):
    import hashlib

    path = save_checkpoint(tmp_path, 2, _model(), StubTokenizer(), _state(2))
    files = _manifest(path)
    on_disk = {p.name for p in path.iterdir()} - {"manifest.json"}
    assert set(files) == on_disk and {"model.safetensors", "trainer_state.pt", "config.json"} <= on_disk
    for name, entry in files.items():
        data = (path / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    last = max((path / name).stat().st_mtime_ns for name in files)
    assert (path / "manifest.json").stat().st_mtime_ns >= last
    assert verify_checkpoint(path) is None


def test_final_model_has_a_manifest_and_resumes(tmp_path):
    model = _model()
    step = save_checkpoint(tmp_path, 3, model, StubTokenizer(), _state(3))
    final = save_final_model(tmp_path, model, StubTokenizer(), checkpoint=step)
    assert set(_manifest(final)) == {p.name for p in final.iterdir()} - {"manifest.json"}
    assert verify_checkpoint(final) is None
    point = resume_point(str(final), tmp_path)
    assert point.path == final and point.state["step"] == 3 and point.note is None
    again = save_final_model(tmp_path, model, None, checkpoint=final)  # from itself: replaced in place
    assert verify_checkpoint(again) is None and load_trainer_state(again)["step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "final_model"]


def _damage(kind: str, path: Path) -> None:
    data = path.read_bytes()
    if kind == "flip":
        path.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    elif kind == "half":
        path.write_bytes(data[: len(data) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "longer":
        path.write_bytes(data + b"\0")
    elif kind == "missing":
        path.unlink()


@pytest.mark.parametrize(("name", "kind", "problem"), [
    ("model.safetensors", "flip", "model.safetensors: checksum mismatch"),
    ("trainer_state.pt", "half", "trainer_state.pt: truncated ("),
    ("config.json", "empty", "config.json: empty (expected "),
    ("model.safetensors", "longer", "model.safetensors: "),
    ("tokenizer_stub.json", "missing", "tokenizer_stub.json: missing"),
    ("manifest.json", "half", "manifest.json: unreadable (not a checkpoint manifest)"),
])
def test_verify_checkpoint_names_the_bad_file(tmp_path, name, kind, problem):
    path = save_checkpoint(tmp_path, 1, _model(), StubTokenizer(), _state(1))
    _damage(kind, path / name)
    found = verify_checkpoint(path)
    assert found is not None and found.startswith(problem) and "\n" not in found, found


@pytest.mark.parametrize(("name", "kind", "problem"), [
    (None, None, None),
    ("model.safetensors", "half", "model.safetensors: truncated ("),
    ("model.safetensors", "empty", "model.safetensors: empty"),
    ("trainer_state.pt", "half", "trainer_state.pt: unreadable ("),
    ("config.json", "empty", "config.json: empty"),
])
def test_a_checkpoint_without_manifest_is_checked_as_far_as_it_can_be(tmp_path, name, kind, problem):
    """Checkpoints written before manifests existed still resume; what can be told is checked."""
    path = save_checkpoint(tmp_path, 1, _model(), StubTokenizer(), _state(1))
    (path / "manifest.json").unlink()
    if name is None:
        assert verify_checkpoint(path) is None
        point = resume_point(True, tmp_path)
        assert point.path == path and point.state["data_position"] == 4 and point.note is None
        return
    _damage(kind, path / name)
    assert verify_checkpoint(path).startswith(problem)


def test_a_checkpoint_without_manifest_with_altered_state_is_caught_by_its_crcs(tmp_path):
    path = save_checkpoint(tmp_path, 1, _model(), StubTokenizer(), _state(1))
    (path / "manifest.json").unlink()
    state = path / "trainer_state.pt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside a tensor's bytes
    state.write_bytes(bytes(data))
    assert verify_checkpoint(path).startswith("trainer_state.pt: damaged (CRC mismatch in ")


def test_resume_point_falls_back_from_damaged_checkpoints_in_one_line(tmp_path):
    from grpo_utils.errors import CheckpointError

    run = tmp_path / "run"
    model = _model()
    for s in (1, 2, 3):
        save_checkpoint(run, s, model, None, _state(s))
    ck = run / "checkpoints"
    assert resume_point(True, run).path == ck / "step_3"
    _damage("flip", ck / "step_3" / "model.safetensors")
    _damage("empty", ck / "step_2" / "trainer_state.pt")
    point = resume_point("latest", run)
    assert point.path == ck / "step_1" and point.state["data_position"] == 4
    assert point.note == ("checkpoint checkpoints/step_3 is damaged (model.safetensors: checksum mismatch), "
                          "checkpoint checkpoints/step_2 is damaged (trainer_state.pt: empty (expected "
                          f"{_manifest(ck / 'step_2')['trainer_state.pt']['size']} bytes)); resuming from "
                          "checkpoints/step_1")
    assert resume_point(str(run), tmp_path / "elsewhere").path == ck / "step_1"  # a run dir: its newest intact
    assert list_checkpoints(run) == [ck / "step_1", ck / "step_2", ck / "step_3"]  # listing is unchanged
    assert resolve_resume(True, run) == ck / "step_3"

    with pytest.raises(CheckpointError) as ei:  # named explicitly: no silent fallback
        resume_point(str(ck / "step_3"), run)
    assert str(ei.value) == (f"resume={ck / 'step_3'}: checkpoint checkpoints/step_3 is damaged "
                             "(model.safetensors: checksum mismatch)")
    _damage("missing", ck / "step_1" / "config.json")
    with pytest.raises(CheckpointError) as ei:
        resume_point(True, run)
    msg = str(ei.value)
    assert msg.startswith("resume=True: no intact checkpoint to resume from: checkpoint checkpoints/step_3 is damaged")
    assert msg.endswith("checkpoint checkpoints/step_1 is damaged (config.json: missing)") and "\n" not in msg

    with pytest.raises(CheckpointError, match=r"^resume=.*nowhere.*: resume checkpoint not found"):
        resume_point(str(tmp_path / "nowhere"), run)
    assert resume_point(False, run) is None and resume_point(True, tmp_path / "fresh") is None


def test_a_hostile_trainer_state_is_passed_over_without_running(tmp_path):
    import hashlib

    run = tmp_path / "run"
    save_checkpoint(run, 1, _model(), None, _state(1))
    bad = save_checkpoint(run, 2, _model(), None, _state(2))
    marker = tmp_path / "pwned"
    torch.save({"step": 2, "trainer": _RunsCode(marker)}, bad / "trainer_state.pt")
    files = _manifest(bad)
    data = (bad / "trainer_state.pt").read_bytes()
    files["trainer_state.pt"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    (bad / "manifest.json").write_text(json.dumps({"format": 1, "files": files}))
    assert verify_checkpoint(bad) is None  # the files are as the manifest says ...
    point = resume_point(True, run)  # ... but the state is refused, unloaded
    assert point.path == run / "checkpoints" / "step_1"
    assert point.note.startswith("checkpoint checkpoints/step_2 is damaged (trainer_state.pt: not plain checkpoint "
                                 "data, refused (loading it would run code")
    assert not marker.exists()


def test_only_trainer_state_is_pickled(tmp_path, tok):
    """Every file a resume (or a collector, or from_pretrained) reads from a checkpoint is JSON,
    text or safetensors, but trainer_state.pt, which loads with weights_only=True."""
    path = save_checkpoint(tmp_path, 1, _model(vocab_size=len(tok)), tok, _state(1))
    for p in path.iterdir():
        head = p.read_bytes()[:8]
        if p.name == "trainer_state.pt":
            assert head[:2] == b"PK"  # torch's zip archive
        elif p.suffix == ".safetensors":
            assert int.from_bytes(head, "little") < p.stat().st_size  # 8-byte header length, then JSON
        else:
            p.read_text(encoding="utf-8")  # text
            assert head[:1] != b"\x80" and head[:2] != b"PK", p.name


def test_an_unlisted_weights_or_pickle_file_is_damage(tmp_path):
    path = save_checkpoint(tmp_path, 1, _model(), StubTokenizer(), _state(1))
    (path / "notes.txt").write_text("a file someone added")  # harmless: not read by a resume
    assert verify_checkpoint(path) is None
    torch.save({"w": torch.zeros(1)}, path / "pytorch_model.bin")
    assert verify_checkpoint(path) == "pytorch_model.bin: not listed in manifest.json"
