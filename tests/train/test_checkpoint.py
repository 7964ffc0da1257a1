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
    save_checkpoint,
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
