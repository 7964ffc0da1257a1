"""Checkpointing for training runs: atomic save, discovery, resume resolution and RNG state.

Layout inside a run directory::

    <run_dir>/checkpoints/step_<N>/
        config.json, model.safetensors (or shards + index)   <- model.save_pretrained
        tokenizer files                                      <- tokenizer.save_pretrained
        trainer_state.pt                                     <- torch.save(trainer_state + {"rng": ...})

A checkpoint directory is written under a temporary name (``.tmp_step_<N>``) and renamed into
place only once everything, ``trainer_state.pt`` included, is on disk, so a crash mid-save never
leaves a directory that :func:`latest_checkpoint` would pick.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "CHECKPOINTS_DIRNAME",
    "TRAINER_STATE_NAME",
    "capture_rng_state",
    "restore_rng_state",
    "save_checkpoint",
    "list_checkpoints",
    "latest_checkpoint",
    "resolve_resume",
    "load_trainer_state",
    "load_model_weights",
    "save_final_model",
]

CHECKPOINTS_DIRNAME = "checkpoints"
#: ``checkpoint.layout``: (folder under the run dir, step directory prefix). ``run_dir`` is the
#: run-directory contract; ``hf`` names them as transformers' Trainer does (what scripts written
#: for it look for). Both are found when resuming, whichever wrote them.
LAYOUTS = {"run_dir": (CHECKPOINTS_DIRNAME, "step_"), "hf": ("", "checkpoint-")}
TRAINER_STATE_NAME = "trainer_state.pt"
_STEP_DIR_RE = re.compile(r"^(?:step_|checkpoint-)(\d+)$")
_TMP_PREFIX = ".tmp_step_"
_OLD_PREFIX = ".old_step_"


# --------------------------------------------------------------------------------------------
# RNG state
# --------------------------------------------------------------------------------------------


def capture_rng_state() -> dict:
    """Snapshot of the python ``random``, numpy global, torch CPU and (if available) CUDA RNGs."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        # Plain ints, not an ndarray: trainer_state.pt then loads with torch.load(weights_only=True).
        "numpy": (name, keys.tolist(), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Restore RNGs captured by :func:`capture_rng_state`.

    Missing entries are skipped. CUDA states are restored for as many devices as both the saved
    state and the current machine have (a checkpoint written on a GPU machine can be resumed on a
    CPU-only one, and vice versa, without error).
    """
    if not state:
        return
    if "python" in state:
        random.setstate(_as_python_random_state(state["python"]))
    if "numpy" in state:
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    if "torch" in state:
        torch.set_rng_state(_as_cpu_byte_tensor(state["torch"]))
    cuda_states = state.get("cuda")
    if cuda_states and torch.cuda.is_available():
        n = min(len(cuda_states), torch.cuda.device_count())
        for device in range(n):
            torch.cuda.set_rng_state(_as_cpu_byte_tensor(cuda_states[device]), device)


def _as_python_random_state(s: Any) -> tuple:
    # random.setstate needs tuples all the way down (a JSON/other round trip may give lists).
    version, internal, gauss = s
    return (version, tuple(internal), gauss)


def _as_cpu_byte_tensor(t: Any) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        t = torch.as_tensor(t)
    return t.detach().to(device="cpu", dtype=torch.uint8)


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------


def _unwrap_model(model):
    """Strip trivial wrappers (torch.compile, DDP/DataParallel) that lack ``save_pretrained``.

    PEFT models and plain HF models are returned as-is: they implement ``save_pretrained``.
    """
    seen = 0
    while not hasattr(model, "save_pretrained") and seen < 8:
        inner = getattr(model, "_orig_mod", None)  # torch.compile
        if inner is None:
            inner = getattr(model, "module", None)  # DistributedDataParallel / DataParallel
        if inner is None:
            break
        model = inner
        seen += 1
    return model


def _checkpoints_dir(run_dir: str | os.PathLike, layout: str = "run_dir") -> Path:
    if layout not in LAYOUTS:
        raise ValueError(f"checkpoint.layout={layout!r} is unknown; expected one of {', '.join(LAYOUTS)}")
    return Path(run_dir) / LAYOUTS[layout][0]


def _step_of(path: Path) -> int | None:
    m = _STEP_DIR_RE.match(path.name)
    return int(m.group(1)) if m else None


def _fsync_file(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(
    run_dir: str | Path,
    step: int,
    model,
    tokenizer,
    trainer_state: dict,
    keep_last: int | None = None,
    layout: str = "run_dir",
) -> Path:
    """Atomically write ``<run_dir>/checkpoints/step_<step>/`` (``layout="hf"``:
    ``<run_dir>/checkpoint-<step>/``) and return its path.

    ``trainer_state`` is saved to ``trainer_state.pt`` with the current RNG state added under
    ``"rng"`` (the caller's dict is not modified). ``tokenizer`` may be None. An existing
    ``step_<step>`` directory is replaced. If ``keep_last`` is set, older ``step_*`` directories
    beyond the newest ``keep_last`` complete checkpoints are deleted after the save succeeded.
    """
    step = int(step)
    if step < 0:
        raise ValueError(f"save_checkpoint: step must be >= 0, got {step}")
    if keep_last is not None and int(keep_last) < 1:
        raise ValueError(f"save_checkpoint: keep_last must be >= 1 or None, got {keep_last}")

    ckpt_root = _checkpoints_dir(run_dir, layout)
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"{LAYOUTS[layout][1]}{step}"
    tmp = ckpt_root / f"{_TMP_PREFIX}{step}"

    # Leftovers of earlier crashed saves are never valid; a single process writes a run dir.
    for stale in ckpt_root.iterdir():
        if stale.is_dir() and (stale.name.startswith(_TMP_PREFIX) or stale.name.startswith(_OLD_PREFIX)):
            shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir()

    try:
        _unwrap_model(model).save_pretrained(str(tmp))  # safetensors by default
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        state = dict(trainer_state)
        state["rng"] = capture_rng_state()
        state_path = tmp / TRAINER_STATE_NAME
        torch.save(state, state_path)
        _fsync_file(state_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    old = None
    if final.exists():
        old = ckpt_root / f"{_OLD_PREFIX}{step}"
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)

    if keep_last is not None:
        _prune(Path(run_dir), int(keep_last))
    return final


def _prune(run_dir: Path, keep_last: int) -> None:
    complete = list_checkpoints(run_dir)
    if len(complete) <= keep_last:
        return
    oldest_kept = _step_of(complete[-keep_last])
    for d in complete[:-keep_last]:
        if _step_of(d) < oldest_kept:
            shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Discovery / resume
# --------------------------------------------------------------------------------------------


def _is_complete(d: Path) -> bool:
    return d.is_dir() and (d / TRAINER_STATE_NAME).is_file()


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint dirs of a run (those with ``trainer_state.pt``), by step, in either
    layout (``checkpoints/step_*`` or ``checkpoint-*``)."""
    found = []
    for folder, prefix in LAYOUTS.values():
        root = Path(run_dir) / folder
        if not root.is_dir():
            continue
        for d in root.iterdir():
            s = _step_of(d)
            if s is not None and d.name.startswith(prefix) and _is_complete(d):
                found.append((s, d))
    return [d for _, d in sorted(found, key=lambda x: x[0])]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


_LATEST_WORDS = {"latest", "true", "auto", "yes"}
_NONE_WORDS = {"", "false", "none", "null", "no"}


def resolve_resume(resume: bool | str | os.PathLike | None, run_dir: str | Path) -> Path | None:
    """Turn a ``resume`` setting into a checkpoint dir (or None for a fresh start).

    * ``False`` / ``None`` (or the strings "false", "none", "null", "no", "") -> None.
    * ``True`` / "latest" (also "true", "auto", "yes") -> latest complete checkpoint of
      ``run_dir``, or None if it has none (a fresh start, not an error).
    * a path -> that checkpoint dir (must contain ``trainer_state.pt``); a run dir (its
      ``checkpoints/`` holds ``step_*``) or a ``checkpoints/`` dir -> its latest checkpoint.
      Anything else raises FileNotFoundError.
    """
    if resume is None or resume is False:
        return None
    if resume is True:
        return latest_checkpoint(run_dir)
    if isinstance(resume, str) and resume.strip().lower() in _NONE_WORDS:
        return None
    if isinstance(resume, str) and resume.strip().lower() in _LATEST_WORDS:
        return latest_checkpoint(run_dir)
    if not isinstance(resume, (str, os.PathLike)):
        raise TypeError(f"resume must be a bool, 'latest' or a path, got {type(resume).__name__}")

    path = Path(os.path.expanduser(os.fspath(resume)))
    if _is_complete(path):
        return path
    if path.is_dir():
        latest = latest_checkpoint(path)  # path is a run dir
        if latest is None and path.name == CHECKPOINTS_DIRNAME:
            latest = latest_checkpoint(path.parent)  # path is the checkpoints/ dir itself
        if latest is not None:
            return latest
    raise FileNotFoundError(
        f"resume checkpoint not found: {path} (expected a checkpoint dir containing "
        f"{TRAINER_STATE_NAME}, or a run dir with {CHECKPOINTS_DIRNAME}/step_<N>/ or checkpoint-<N>/)"
    )


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_trainer_state(ckpt_dir: str | Path) -> dict:
    """Load ``trainer_state.pt`` as plain data only (``weights_only=True``): a checkpoint someone
    hands you cannot run code on load. Raises :class:`~grpo_utils.errors.CheckpointError` for a
    file that holds anything else.

    Tensors are mapped to CPU; ``optimizer.load_state_dict`` moves them to the parameters'
    devices. The RNG state under ``"rng"`` is returned, not restored.
    """
    from grpo_utils.errors import CheckpointError

    path = Path(ckpt_dir) / TRAINER_STATE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {TRAINER_STATE_NAME} in checkpoint dir {Path(ckpt_dir)}")
    # Checkpoints written before the numpy RNG state was stored as ints hold one uint32 ndarray;
    # allowing numpy's array reconstruction (data, not code) keeps them loadable.
    numpy_array = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    try:
        with torch.serialization.safe_globals(numpy_array):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: not plain checkpoint data, refused (loading it would run code: "
                              f"{str(e).strip().splitlines()[0][:200]})") from None


def _read_safetensors_state(ckpt_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = ckpt_dir / "model.safetensors.index.json"
    single = ckpt_dir / "model.safetensors"
    if index.is_file():
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        state: dict[str, torch.Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            state.update(load_file(str(ckpt_dir / shard), device="cpu"))
        return state
    if single.is_file():
        return load_file(str(single), device="cpu")
    # Fallback: exactly one *.safetensors file with another name.
    files = sorted(ckpt_dir.glob("*.safetensors"))
    if len(files) == 1:
        return load_file(str(files[0]), device="cpu")
    raise FileNotFoundError(
        f"no safetensors weights in {ckpt_dir} (expected model.safetensors or "
        f"model.safetensors.index.json)"
    )


def load_model_weights(ckpt_dir: str | Path, model) -> None:
    """Load weights written by ``save_pretrained`` into an existing model, strictly.

    Handles single-file and sharded safetensors. Parameters omitted from the file because they are
    tied to (share storage with) a loaded parameter, e.g. ``lm_head.weight`` with tied embeddings,
    are not reported as missing. If the file's keys do not match the model's (transformers may save
    some architectures in an "original" key layout that it converts on load), the checkpoint is
    loaded through ``from_pretrained`` on CPU and copied in. Any remaining missing or unexpected
    key raises RuntimeError.
    """
    ckpt_dir = Path(ckpt_dir)
    target = _unwrap_model(model)
    state = _read_safetensors_state(ckpt_dir)
    missing, unexpected = _check_keys(target, state)
    if (missing or unexpected) and hasattr(type(target), "from_pretrained"):
        loaded = type(target).from_pretrained(str(ckpt_dir))  # loads on CPU
        state = loaded.state_dict()
        del loaded
        missing, unexpected = _check_keys(target, state)
    if missing or unexpected:
        raise RuntimeError(
            f"load_model_weights({ckpt_dir}): state dict mismatch; missing keys: {missing[:10]}"
            f"{' ...' if len(missing) > 10 else ''}, unexpected keys: {unexpected[:10]}"
            f"{' ...' if len(unexpected) > 10 else ''}"
        )
    with torch.no_grad():
        target.load_state_dict(state, strict=False)


def _check_keys(model: torch.nn.Module, state: dict) -> tuple[list[str], list[str]]:
    """(missing, unexpected) keys of ``state`` for ``model``, ignoring tied (aliased) params."""
    own = model.state_dict(keep_vars=True)
    unexpected = [k for k in state if k not in own]
    loaded_ptrs = {own[k].data_ptr() for k in state if k in own}
    missing = [k for k in own if k not in state and own[k].data_ptr() not in loaded_ptrs]
    return missing, unexpected


FINAL_MODEL_DIRNAME = "final_model"


def save_final_model(run_dir: str | Path, model, tokenizer, checkpoint: Path | None = None) -> Path:
    """``<run_dir>/final_model/``: the last weights and the tokenizer as a Hugging Face model
    directory, plus the training state of ``checkpoint`` (the last step's, so ``final_model/``
    resumes too), written under a temporary name and renamed into place (an older one is replaced)."""
    final = Path(run_dir) / FINAL_MODEL_DIRNAME
    tmp = final.with_name(f".tmp_{FINAL_MODEL_DIRNAME}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _unwrap_model(model).save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if checkpoint is not None and (Path(checkpoint) / TRAINER_STATE_NAME).is_file():
            shutil.copy2(Path(checkpoint) / TRAINER_STATE_NAME, tmp / TRAINER_STATE_NAME)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final
