"""Checkpointing for training runs: atomic save, discovery, resume resolution and RNG state.

Layout inside a run directory::

    <run_dir>/checkpoints/step_<N>/
        config.json, model.safetensors (or shards + index)   <- model.save_pretrained (LoRA: merged)
        adapter/ (LoRA only)                                 <- the PEFT adapter, what a LoRA resume loads
        tokenizer files                                      <- tokenizer.save_pretrained
        trainer_state.pt                                     <- torch.save(trainer_state + {"rng": ...})
        manifest.json                                        <- sha256 and size of every file above

A checkpoint directory is written under a temporary name (``.tmp_step_<N>``) and renamed into
place only once everything, ``trainer_state.pt`` included, is on disk and ``manifest.json`` has
been written last, so a crash mid-save never leaves a directory that :func:`latest_checkpoint`
would pick. :func:`resume_point` checks a checkpoint against its manifest before a run resumes
from it (and falls back to the newest intact one); a write that fails because the disk is full
raises a one-line :class:`~grpo_utils.errors.CheckpointError` naming the checkpoint still intact.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch

from grpo_utils.models.lora import ADAPTER_DIRNAME, is_lora, load_adapter, save_model

if TYPE_CHECKING:
    from grpo_utils.errors import CheckpointError

__all__ = [
    "CHECKPOINTS_DIRNAME",
    "TRAINER_STATE_NAME",
    "MANIFEST_NAME",
    "capture_rng_state",
    "restore_rng_state",
    "save_checkpoint",
    "list_checkpoints",
    "latest_checkpoint",
    "resolve_resume",
    "verify_checkpoint",
    "resume_point",
    "ResumePoint",
    "write_error",
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
#: Written last into a checkpoint: ``{"format": 1, "files": {name: {"sha256": ..., "size": ...}}}``.
MANIFEST_NAME = "manifest.json"
_MANIFEST_FORMAT = 1
_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".bin", ".pth", ".pkl", ".ckpt")  # weights, and pickles
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

    PEFT models and plain HF models are returned as-is: they implement ``save_pretrained``
    (a PEFT model is saved merged, plus its adapter: :func:`grpo_utils.models.lora.save_model`).
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


def _fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (where the platform allows opening a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _files_of(d: Path) -> list[tuple[str, Path]]:
    """(name relative to ``d``, path) of every regular file under ``d`` but the manifest, by name."""
    found = ((p.relative_to(d).as_posix(), p) for p in d.rglob("*") if p.is_file())
    return sorted((name, p) for name, p in found if name != MANIFEST_NAME)


def _digest(path: Path, sync: bool = False) -> tuple[str, int]:
    """(sha256 hex digest, size in bytes) of a file; ``sync`` also flushes it to the disk."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
        if sync:
            os.fsync(f.fileno())  # an I/O error here is the write's, reported as such
    return h.hexdigest(), size


def _write_manifest(d: Path) -> None:
    """``d/manifest.json``: the sha256 and size of every other file in ``d``, each flushed to the
    disk first, then the manifest itself: the last file of a checkpoint."""
    files = {}
    for name, path in _files_of(d):
        digest, size = _digest(path, sync=True)
        files[name] = {"sha256": digest, "size": size}
    with open(d / MANIFEST_NAME, "w", encoding="utf-8") as f:
        f.write(json.dumps({"format": _MANIFEST_FORMAT, "files": files}, indent=1) + "\n")
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(d)


def _swap_into_place(tmp: Path, final: Path, old: Path) -> None:
    """Rename the finished ``tmp`` to ``final``; an existing ``final`` is moved to ``old`` first and
    deleted after (put back if the rename fails)."""
    moved = final.exists()
    if moved:
        os.replace(final, old)
    try:
        os.replace(tmp, final)
    except BaseException:
        if moved:
            os.replace(old, final)
        raise
    if moved:
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(final.parent)


# --------------------------------------------------------------------------------------------
# Write failures: one line, naming what is still intact
# --------------------------------------------------------------------------------------------

#: What the disk, not the program, is to blame for.
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EFBIG, errno.EROFS}
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how safetensors' Rust errors carry the errno
_TORCH_WRITER_FAILED = ("inline_container", "unexpected pos", "PytorchStreamWriter failed")  # torch.save, no errno
_LOW_SPACE = 1 << 20  # bytes: below this, a write that failed without saying why ran out of space


def _chain(error: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    while error is not None and error not in chain and len(chain) < 16:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def _free_bytes(path: Path) -> int:
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return _LOW_SPACE


def _strerror(code: int) -> str:
    text = os.strerror(code)
    return text[:1].lower() + text[1:]


_DISK_REASONS = {_strerror(code) for code in _DISK_ERRNOS}  # lines that name the mount and its free space


def _write_failure(error: BaseException, where: Path, any_errno: bool = True) -> str | None:
    """Why a write under ``where`` failed, in words ("no space left on device"), when the disk or
    the file system is to blame: the errno of an ``OSError`` (only a disk's errno unless
    ``any_errno``), the ``(os error N)`` safetensors puts in its message, or, for torch.save's
    "unexpected pos" (it carries no errno), the free space left under ``where``. None for
    anything else (a bug keeps its traceback)."""
    if not isinstance(error, Exception):
        return None  # Ctrl-C, SIGTERM: not the disk's doing
    chain = _chain(error)
    for e in chain:
        code = e.errno if isinstance(e, OSError) else None
        if code is None and (m := _RUST_OS_ERROR.search(str(e))):
            code = int(m.group(1))
        if code is not None and (any_errno or code in _DISK_ERRNOS):
            return _strerror(code)
    for e in chain:
        if isinstance(e, RuntimeError) and any(s in str(e) for s in _TORCH_WRITER_FAILED):
            if _free_bytes(where) < _LOW_SPACE:
                return _strerror(errno.ENOSPC)
            return f"write error ({str(e).strip().splitlines()[0][:160]})"
    return None


def shown_path(path: str | Path, run_dir: str | Path | None) -> str:
    """How a message names a checkpoint: relative to the run dir when inside it."""
    return _shown(Path(path), run_dir)


def _shown(path: Path, run_dir: str | Path | None) -> str:
    """``path`` relative to the run dir when inside it (``checkpoints/step_4``), else as given."""
    if run_dir is not None:
        try:
            return Path(path).relative_to(Path(run_dir)).as_posix()
        except ValueError:
            pass
    return str(path)


def _mount(path: Path) -> tuple[Path, int | None]:
    """The mount point holding ``path`` (or where it would be created) and its free MiB (None when
    it cannot be told)."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    try:
        return path, shutil.disk_usage(path).free >> 20
    except OSError:
        return path, None


def _failure_line(reason: str, writing: Path, run_dir: str | Path) -> str:
    """``<reason> while writing <absolute path>[ (mount <mount point>, <N> MiB free)]; <what is
    intact>``: the mount and its free space when the disk is to blame, so the line says which
    file system to make room on."""
    latest = latest_checkpoint(run_dir)
    intact = f"{_shown(latest, run_dir)} is intact" if latest is not None else "no checkpoint was written before it"
    where = os.path.abspath(writing)
    if reason in _DISK_REASONS:
        mount, free = _mount(Path(writing))
        where += f" (mount {mount}, {'free space unknown' if free is None else f'{free} MiB free'})"
    return f"{reason} while writing {where}; {intact}"


def write_error(error: BaseException, run_dir: str | Path, writing: str | Path | None = None) -> CheckpointError | None:
    """The one-line :class:`~grpo_utils.errors.CheckpointError` for a write under ``run_dir`` that
    failed because of the disk (full, over quota, I/O error, ...), naming what was being written
    and the newest checkpoint still intact, e.g. ``no space left on device while writing
    checkpoints/step_19; checkpoints/step_18 is intact``; None for any other error.

    ``writing``: the file or directory being written, when the caller knows (then any errno
    counts); otherwise the error's own file name, which must lie under ``run_dir``, or a disk
    errno (ENOSPC, EDQUOT, EIO, ...) says it was a write of the run's."""
    from grpo_utils.errors import CheckpointError

    any_errno = writing is not None
    if writing is None:
        named = [Path(e.filename) for e in _chain(error) if isinstance(e, OSError) and e.filename]
        inside = [p for p in named if _shown(p, run_dir) != str(p)]
        writing = inside[0] if inside else (named[0] if named else Path(run_dir))
        any_errno = bool(inside)
    reason = _write_failure(error, Path(writing), any_errno=any_errno)
    if reason is None:
        return None
    return CheckpointError(_failure_line(reason, Path(writing), run_dir))


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
    ``"rng"`` (the caller's dict is not modified). ``tokenizer`` may be None. ``manifest.json``
    (every file's sha256 and size) is written last, then the directory is renamed into place. An
    existing ``step_<step>`` directory is replaced. If ``keep_last`` is set, older ``step_*``
    directories beyond the newest ``keep_last`` complete checkpoints are deleted after the save
    succeeded.

    A write that fails because of the disk (full, over quota, I/O error) raises a one-line
    :class:`~grpo_utils.errors.CheckpointError` naming the checkpoint still intact; the partial
    directory is removed either way and earlier checkpoints are left as they were.
    """
    step = int(step)
    if step < 0:
        raise ValueError(f"save_checkpoint: step must be >= 0, got {step}")
    if keep_last is not None and int(keep_last) < 1:
        raise ValueError(f"save_checkpoint: keep_last must be >= 1 or None, got {keep_last}")

    ckpt_root = _checkpoints_dir(run_dir, layout)
    final = ckpt_root / f"{LAYOUTS[layout][1]}{step}"
    tmp = ckpt_root / f"{_TMP_PREFIX}{step}"
    try:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        # Leftovers of earlier crashed saves are never valid; a single process writes a run dir.
        for stale in ckpt_root.iterdir():
            if stale.is_dir() and (stale.name.startswith(_TMP_PREFIX) or stale.name.startswith(_OLD_PREFIX)):
                shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
        save_model(_unwrap_model(model), tmp)  # safetensors by default
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        state = dict(trainer_state)
        state["rng"] = capture_rng_state()
        torch.save(state, tmp / TRAINER_STATE_NAME)
        _write_manifest(tmp)
        _swap_into_place(tmp, final, ckpt_root / f"{_OLD_PREFIX}{step}")
    except BaseException as e:
        reason = _write_failure(e, tmp)  # before the partial directory goes: its space is the evidence
        shutil.rmtree(tmp, ignore_errors=True)
        if reason is None:
            raise
        from grpo_utils.errors import CheckpointError

        raise CheckpointError(_failure_line(reason, final, run_dir)) from None

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

    Nothing is verified here; :func:`resume_point` checks the checkpoint's files too.
    """
    return _resolve(resume, run_dir)[0]


def _resolve(resume, run_dir: str | Path) -> tuple[Path | None, bool]:
    """:func:`resolve_resume`, and whether the checkpoint was named explicitly (a checkpoint dir
    given as the path, rather than "the latest" of a run)."""
    if resume is None or resume is False:
        return None, False
    if resume is True:
        return latest_checkpoint(run_dir), False
    if isinstance(resume, str) and resume.strip().lower() in _NONE_WORDS:
        return None, False
    if isinstance(resume, str) and resume.strip().lower() in _LATEST_WORDS:
        return latest_checkpoint(run_dir), False
    if isinstance(resume, str) and resume.strip().lower() == "must":
        latest = latest_checkpoint(run_dir)
        if latest is None:
            raise FileNotFoundError(f"no checkpoint in {run_dir} to resume from (expected {CHECKPOINTS_DIRNAME}/"
                                    "step_<N>/ or checkpoint-<N>/); resume=true would start fresh instead")
        return latest, False
    if not isinstance(resume, (str, os.PathLike)):
        raise TypeError(f"resume must be a bool, 'latest' or a path, got {type(resume).__name__}")

    path = Path(os.path.expanduser(os.fspath(resume)))
    if _is_complete(path):
        return path, True
    if path.is_dir():
        latest = latest_checkpoint(path)  # path is a run dir
        if latest is None and path.name == CHECKPOINTS_DIRNAME:
            latest = latest_checkpoint(path.parent)  # path is the checkpoints/ dir itself
        if latest is not None:
            return latest, False
    raise FileNotFoundError(
        f"resume checkpoint not found: {path} (expected a checkpoint dir containing "
        f"{TRAINER_STATE_NAME}, or a run dir with {CHECKPOINTS_DIRNAME}/step_<N>/ or checkpoint-<N>/)"
    )


# --------------------------------------------------------------------------------------------
# Verification: which checkpoint a run may resume from
# --------------------------------------------------------------------------------------------


def fresh_start_note(resume: bool | str | os.PathLike | None, run_dir: str | Path) -> str | None:
    """The one warning line for ``resume=true`` (or ``latest``) when the run dir has no checkpoint:
    the run starts from scratch, which is said rather than done silently; None otherwise."""
    asks = resume is True or (isinstance(resume, str) and resume.strip().lower() in _LATEST_WORDS)
    if not asks or latest_checkpoint(run_dir) is not None:
        return None
    return (f"warning: resume={str(resume).lower()} but {run_dir} has no checkpoint yet; starting from scratch "
            "(resume=must refuses to)")


def verify_checkpoint(ckpt_dir: str | Path) -> str | None:
    """What is wrong with a checkpoint's files, as ``"<file>: <problem>"`` (``"model.safetensors:
    checksum mismatch"``), or None when nothing is found.

    With a ``manifest.json`` every file it lists must be there with its size and sha256. A
    checkpoint without one (written before manifests existed) is checked for what can be told
    without it: JSON files parse, safetensors files are as long as their header says,
    ``trainer_state.pt`` is a whole zip archive whose members match their CRCs.
    Whether ``trainer_state.pt`` loads is :func:`resume_point`'s check."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return "missing"
    manifest = d / MANIFEST_NAME
    if manifest.exists():
        return _check_manifest(d, manifest)
    return _check_unverified(d)


def _check_manifest(d: Path, manifest: Path) -> str | None:
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
        files = data["files"]
        entries = [(str(name), str(e["sha256"]), int(e["size"])) for name, e in files.items()]
    except OSError as e:
        return f"{MANIFEST_NAME}: unreadable ({e.strerror or e})"
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"{MANIFEST_NAME}: unreadable (not a checkpoint manifest)"
    if data.get("format") != _MANIFEST_FORMAT:
        return f"{MANIFEST_NAME}: format {data.get('format')!r} is not {_MANIFEST_FORMAT} (written by another version)"
    for name, _ in _files_of(d):  # what a resume reads, and anything that could hold a pickle, must be listed
        if name not in files and (name == "config.json" or name.endswith(_WEIGHT_SUFFIXES)):
            return f"{name}: not listed in {MANIFEST_NAME}"
    for name, sha256, size in entries:
        if Path(name).is_absolute() or ".." in Path(name).parts:
            return f"{MANIFEST_NAME}: names a file outside the checkpoint ({name})"
        path = d / name
        if not path.is_file():
            return f"{name}: missing"
        try:
            actual = path.stat().st_size
            if actual != size:
                return f"{name}: {_size_problem(actual, size)}"
            digest, _ = _digest(path)
        except OSError as e:
            return f"{name}: unreadable ({e.strerror or e})"
        if digest != sha256:
            return f"{name}: checksum mismatch"
    return None


def _size_problem(actual: int, expected: int) -> str:
    if actual == 0:
        return f"empty (expected {expected} bytes)"
    if actual < expected:
        return f"truncated ({actual} of {expected} bytes)"
    return f"{actual} bytes, expected {expected}"


def _check_unverified(d: Path) -> str | None:
    for name, path in _files_of(d):
        try:
            if name.endswith(".json"):
                if path.stat().st_size == 0:
                    return f"{name}: empty"
                try:
                    json.loads(path.read_text(encoding="utf-8"))
                except (ValueError, UnicodeDecodeError):
                    return f"{name}: unreadable (not JSON)"
            elif name.endswith(".safetensors"):
                problem = _safetensors_problem(path)
                if problem:
                    return f"{name}: {problem}"
            elif name == TRAINER_STATE_NAME:
                problem = _zip_problem(path)
                if problem:
                    return f"{name}: {problem}"
        except OSError as e:
            return f"{name}: unreadable ({e.strerror or e})"
    return None


def _safetensors_problem(path: Path) -> str | None:
    """Whether a safetensors file is as long as its header says (8-byte length, JSON header, data)."""
    size = path.stat().st_size
    if size == 0:
        return "empty"
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 0 or 8 + n > size:
            return f"truncated ({size} bytes, less than its header)"
        try:
            header = json.loads(f.read(n))
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, AttributeError, IndexError):
            return "unreadable (not a safetensors file)"
    if size != 8 + n + end:
        return _size_problem(size, 8 + n + end)
    return None


def _zip_problem(path: Path) -> str | None:
    """torch.save writes a zip archive with a CRC-32 per member: a cut or altered one shows."""
    if path.stat().st_size == 0:
        return "empty"
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, EOFError, ValueError) as e:
        return f"unreadable ({str(e).strip()[:120] or 'not a zip archive'})"
    return f"damaged (CRC mismatch in {bad})" if bad else None


class ResumePoint(NamedTuple):
    """Where a run resumes: the checkpoint dir, its ``trainer_state.pt`` (loaded as plain data),
    and, when newer checkpoints were damaged and passed over, the one line that says so."""

    path: Path
    state: dict
    note: str | None = None


def resume_point(resume: bool | str | os.PathLike | None, run_dir: str | Path) -> ResumePoint | None:
    """The checkpoint a ``resume`` setting resumes from (:func:`resolve_resume`), verified
    (:func:`verify_checkpoint`) and with its training state loaded; None for a fresh start.

    "The latest" (``resume=true``, or a run dir) passes over damaged checkpoints to the newest
    intact one, and :attr:`ResumePoint.note` says so in one line (``checkpoint checkpoints/step_4
    is damaged (model.safetensors: checksum mismatch); resuming from checkpoints/step_2``). A
    checkpoint named explicitly is used as it is or not at all. Raises
    :class:`~grpo_utils.errors.CheckpointError` (one line) when the named checkpoint is missing
    or damaged, or no checkpoint of the run is intact."""
    from grpo_utils.errors import CheckpointError

    try:
        chosen, explicit = _resolve(resume, run_dir)
    except FileNotFoundError as e:
        raise CheckpointError(f"resume={resume}: {e}") from None
    if chosen is None:
        return None
    problem, state = _examine(chosen)
    if problem is None:
        return ResumePoint(chosen, state)
    if explicit:
        raise CheckpointError(f"resume={resume}: checkpoint {_shown(chosen, run_dir)} is damaged ({problem})")
    damaged = [(chosen, problem)]
    step = _step_of(chosen)
    older = [c for c in list_checkpoints(_run_dir_of(chosen)) if c != chosen and _step_of(c) <= step]
    for candidate in reversed(older):
        problem, state = _examine(candidate)
        if problem is None:
            note = f"{_damaged(damaged, run_dir)}; resuming from {_shown(candidate, run_dir)}"
            return ResumePoint(candidate, state, note)
        damaged.append((candidate, problem))
    raise CheckpointError(f"resume={resume}: no intact checkpoint to resume from: {_damaged(damaged, run_dir)}")


def _damaged(damaged: list[tuple[Path, str]], run_dir) -> str:
    return ", ".join(f"checkpoint {_shown(d, run_dir)} is damaged ({problem})" for d, problem in damaged)


def _run_dir_of(ckpt: Path) -> Path:
    if ckpt.name.startswith(LAYOUTS["run_dir"][1]) and ckpt.parent.name == CHECKPOINTS_DIRNAME:
        return ckpt.parent.parent
    return ckpt.parent


def _examine(ckpt_dir: Path) -> tuple[str | None, dict | None]:
    """(problem, None) or (None, the loaded training state)."""
    problem = verify_checkpoint(ckpt_dir)
    if problem is not None:
        return problem, None
    try:
        state = _read_trainer_state(Path(ckpt_dir) / TRAINER_STATE_NAME)
    except _Refused as e:
        return f"{TRAINER_STATE_NAME}: {e}", None
    except Exception as e:  # whatever a damaged file makes torch.load raise
        first = (str(e).strip().splitlines() or [""])[0][:160]
        return f"{TRAINER_STATE_NAME}: unreadable ({type(e).__name__}{': ' + first if first else ''})", None
    if not isinstance(state, dict) or "step" not in state:
        return f"{TRAINER_STATE_NAME}: not a training state (no step)", None
    return None, state


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


class _Refused(Exception):
    """trainer_state.pt holds more than plain data (its message says why)."""


def _read_trainer_state(path: Path) -> dict:
    # Checkpoints written before the numpy RNG state was stored as ints hold one uint32 ndarray;
    # allowing numpy's array reconstruction (data, not code) keeps them loadable.
    numpy_array = [np._core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    try:
        with torch.serialization.safe_globals(numpy_array):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise _Refused(f"not plain checkpoint data, refused (loading it would run code: "
                       f"{str(e).strip().splitlines()[0][:200]})") from None


def load_trainer_state(ckpt_dir: str | Path) -> dict:
    """Load ``trainer_state.pt`` as plain data only (``weights_only=True``): a checkpoint someone
    hands you cannot run code on load. Raises :class:`~grpo_utils.errors.CheckpointError` for a
    file that holds anything else.

    Tensors are mapped to CPU; ``optimizer.load_state_dict`` moves them to the parameters'
    devices. The RNG state under ``"rng"`` is returned, not restored. (The file is not checked
    against the manifest here: :func:`resume_point` does both.)
    """
    from grpo_utils.errors import CheckpointError

    path = Path(ckpt_dir) / TRAINER_STATE_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {TRAINER_STATE_NAME} in checkpoint dir {Path(ckpt_dir)}")
    try:
        return _read_trainer_state(path)
    except _Refused as e:
        raise CheckpointError(f"{path}: {e}") from None


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
    """Load weights written by ``save_pretrained`` into an existing model, strictly (a LoRA
    policy: the checkpoint's ``adapter/``, see :func:`grpo_utils.models.lora.load_adapter`).

    Handles single-file and sharded safetensors. Parameters omitted from the file because they are
    tied to (share storage with) a loaded parameter, e.g. ``lm_head.weight`` with tied embeddings,
    are not reported as missing. If the file's keys do not match the model's (transformers may save
    some architectures in an "original" key layout that it converts on load), the checkpoint is
    loaded through ``from_pretrained`` on CPU and copied in. Any remaining missing or unexpected
    key raises RuntimeError.
    """
    ckpt_dir = Path(ckpt_dir)
    target = _unwrap_model(model)
    if is_lora(target) or (ckpt_dir / ADAPTER_DIRNAME).is_dir():
        # A LoRA run resumes from its adapter, onto the base it was trained from (model.name): the
        # merged weights beside it would add the adapters' update twice.
        from grpo_utils.errors import CheckpointError

        if not is_lora(target):
            raise CheckpointError(f"checkpoint {ckpt_dir} holds a LoRA adapter ({ADAPTER_DIRNAME}/); it resumes "
                                  "only with train_model.lora.enabled=true")
        load_adapter(ckpt_dir, target)
        return
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
    resumes too) and ``manifest.json``, written under a temporary name and renamed into place (an
    older one is replaced). A write the disk fails raises a one-line
    :class:`~grpo_utils.errors.CheckpointError`, as :func:`save_checkpoint` does."""
    final = Path(run_dir) / FINAL_MODEL_DIRNAME
    tmp = final.with_name(f".tmp_{FINAL_MODEL_DIRNAME}")
    old = final.with_name(f".old_{FINAL_MODEL_DIRNAME}")
    try:
        for stale in (tmp, old):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_model(_unwrap_model(model), tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        if checkpoint is not None and (Path(checkpoint) / TRAINER_STATE_NAME).is_file():
            shutil.copy2(Path(checkpoint) / TRAINER_STATE_NAME, tmp / TRAINER_STATE_NAME)
        _write_manifest(tmp)
        _swap_into_place(tmp, final, old)
    except BaseException as e:
        reason = _write_failure(e, tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if reason is None:
            raise
        from grpo_utils.errors import CheckpointError

        raise CheckpointError(_failure_line(reason, final, run_dir)) from None
    return final
