"""Run metrics: JSONL logging (optionally mirrored to wandb), summary, reward-curve plot.

``<run_dir>/metrics.jsonl`` holds one JSON object per line. Training lines carry ``step`` and
``reward/mean`` (plus whatever else the trainer logs, e.g. ``loss``); eval lines carry ``step``
and ``eval/...`` keys. Every line also carries ``time``, wall-clock seconds since the logger
started.

Each line is written whole or not at all: one ``write`` per line, and a write that fails (a full
disk) is cut back to the last complete line before the error propagates. A line cut short by a
crash is dropped from the file when the run resumes (a copy of the file as it was is kept).
"""

from __future__ import annotations

import json
import math
import numbers
import os
import shutil
import time
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "METRICS_FILENAME",
    "SUMMARY_FILENAME",
    "MetricsLogger",
    "read_metrics",
    "write_summary",
    "plot_reward_curve",
    "format_summary",
]

METRICS_FILENAME = "metrics.jsonl"
SUMMARY_FILENAME = "summary.json"
_BACKENDS = ("none", "wandb")
_EVAL_PREFIX = "eval/"


# --------------------------------------------------------------------------------------------
# value conversion
# --------------------------------------------------------------------------------------------


_PLAIN = (float, int, bool, str, type(None))


def _to_jsonable(value: Any) -> Any:
    """Tensors / numpy scalars -> python floats; arrays -> lists; other values unchanged."""
    if type(value) in _PLAIN:  # most training metrics: returned as the checks below would
        return value
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    # torch tensors (checked by duck typing so torch is not needed here)
    if hasattr(value, "detach") and hasattr(value, "numel"):
        t = value.detach()
        if t.numel() == 1:
            return str(t.item()) if t.dtype.is_complex else float(t.item())
        return [_to_jsonable(v) for v in t.cpu().tolist()]
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is a torch dependency
        np = None
    if np is not None:
        if isinstance(value, np.bool_):
            return bool(value)
        if isinstance(value, np.number):
            return float(value)
        if isinstance(value, np.ndarray):
            if value.size == 1:
                return float(value.reshape(()))
            return [_to_jsonable(v) for v in value.tolist()]
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, dict):
        return {str(k): _to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_jsonable(v) for v in value]
    return str(value)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _short(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        return f"{v:.3g}" if abs(v) >= 1e-3 or v == 0 else f"{v:.1e}"
    return str(v)


# --------------------------------------------------------------------------------------------
# logger
# --------------------------------------------------------------------------------------------


class MetricsLogger:
    """Append metrics to ``<run_dir>/metrics.jsonl``, mirror them to wandb, drive a tqdm bar.

    On resume (``start_step > 0``) an existing ``metrics.jsonl`` is first copied to
    ``metrics.pre_resume_step_<start_step>.jsonl`` (``....1.jsonl``, ``.2`` ... if that name is
    taken), then rewritten with only the lines whose ``step`` is <= ``start_step`` (and lines with
    no step); logging appends after them. A fresh start (``start_step == 0``) over an existing,
    non-empty ``metrics.jsonl`` moves the old file aside the same way and starts an empty one.

    :meth:`logged_eval` tells whether an eval line for a step is in the file already (kept from
    before the resume or written since), so a resumed run does not evaluate and log that step again.
    A write error propagates as an ``OSError`` naming ``metrics.jsonl``, after the file is cut back
    to its last complete line.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        *,
        backend: str = "none",
        project: str | None = None,
        run_name: str | None = None,
        config: dict | None = None,
        total_steps: int | None = None,
        start_step: int = 0,
        progress: bool = True,
        log_every: int = 1,
    ):
        backend = "none" if backend is None else str(backend).lower()
        if backend not in _BACKENDS:
            raise ValueError(f"logger={backend!r} is not supported; allowed values: {list(_BACKENDS)}")
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILENAME
        self.backend = backend
        self.start_step = int(start_step)
        self.total_steps = total_steps
        if int(log_every) < 1:
            raise ValueError(f"logger.log_every={log_every} must be >= 1")
        self.log_every = int(log_every)
        self.backup_path: Path | None = None
        self._closed = False
        self._wandb_run = None
        self._bar = None
        self._postfix: dict[str, str] = {}
        self._evals: dict[int, dict] = {}  # step -> its eval line's eval/ values

        if backend == "wandb":
            self._wandb_run = self._init_wandb(project, run_name, config)

        self._prepare_file()
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as e:
            raise _named(e, self.path) from None
        self._end = os.fstat(self._fd).st_size  # where the last complete line ends
        self._t0 = time.time()

        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total_steps,
                initial=self.start_step,
                desc="train",
                unit="step",
                dynamic_ncols=True,
            )

    # -- setup --------------------------------------------------------------------------------

    def _init_wandb(self, project, run_name, config):
        try:
            import wandb
        except ImportError as e:
            raise ImportError("logger=wandb needs the wandb package: pip install wandb") from e
        kwargs: dict[str, Any] = dict(
            project=project,
            name=run_name,
            config=_to_jsonable(dict(config)) if config else None,
            dir=str(self.run_dir),
        )
        mode = os.environ.get("WANDB_MODE")
        if mode:  # wandb reads it too; passing it keeps "offline" explicit and unambiguous
            kwargs["mode"] = mode
        return wandb.init(**kwargs)

    def _backup_name(self) -> Path:
        base = f"metrics.pre_resume_step_{self.start_step}"
        cand = self.run_dir / f"{base}.jsonl"
        i = 1
        while cand.exists():
            cand = self.run_dir / f"{base}.{i}.jsonl"
            i += 1
        return cand

    def _prepare_file(self) -> None:
        if not self.path.is_file() or self.path.stat().st_size == 0:
            return
        backup = self._backup_name()
        if self.start_step <= 0:
            os.replace(self.path, backup)
            self.backup_path = backup
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            shutil.copy2(self.path, backup)
            kept: list[str] = []
            for line, rec in _jsonl_lines(backup):
                if rec is None:
                    continue  # e.g. a line cut short by a crash; it stays in the backup
                step = rec.get("step") if isinstance(rec, dict) else None
                if step is None or (_is_number(step) and step <= self.start_step):
                    kept.append(line)
                    if step is not None and _is_eval(rec):
                        self._evals[int(step)] = _eval_values(rec)
            with open(tmp, "w", encoding="utf-8") as f:
                f.write("".join(line + "\n" for line in kept))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError as e:  # e.g. a full disk: metrics.jsonl is left as it was, and nothing else
            for partial in (tmp, backup):
                partial.unlink(missing_ok=True)
            raise _named(e, self.path) from None
        self.backup_path = backup

    # -- logging ------------------------------------------------------------------------------

    def _write(self, metrics: dict, step: int) -> dict:
        if self._closed:
            raise RuntimeError("MetricsLogger.log called after close()")
        step = int(step)
        record = {"step": step}
        for k, v in metrics.items():
            k = str(k)
            if k in ("step", "time"):
                continue
            record[k] = _to_jsonable(v)
        record["time"] = round(time.time() - self._t0, 3)
        self._append((json.dumps(record) + "\n").encode("utf-8"))
        if self._wandb_run is not None:
            payload = {k: v for k, v in record.items() if k != "step"}
            self._wandb_run.log(payload, step=step)
        return record

    def _append(self, data: bytes) -> None:
        """Append one line with one ``write`` (more only if the system writes less); if that fails,
        or is interrupted before the line is whole, the file is cut back to the last complete line."""
        written = 0
        try:
            written = os.write(self._fd, data)
            while written < len(data):
                written += os.write(self._fd, data[written:])
        except BaseException as e:
            if written < len(data):
                try:
                    os.ftruncate(self._fd, self._end)
                except OSError:
                    pass
            else:
                self._end += len(data)
            if isinstance(e, OSError):
                raise _named(e, self.path) from None
            raise
        self._end += len(data)

    def logged_eval(self, step: int) -> dict | None:
        """The ``eval/`` values of the eval line for ``step`` already in the file (kept from
        before a resume, or logged since), or None."""
        values = self._evals.get(int(step))
        return dict(values) if values is not None else None

    def log(self, metrics: dict, step: int) -> None:
        """Write one training line ``{"step", **metrics, "time"}`` (every ``log_every``-th step and
        the last) and advance the bar to ``step``."""
        if step % self.log_every and step != self.total_steps:
            if self._bar is not None:
                self._bar.update(int(step) - self._bar.n)
            return
        record = self._write(metrics, step)
        if self._bar is not None:
            for key, label in (("reward/mean", "reward"), ("loss", "loss")):
                if key in record and record[key] is not None:
                    self._postfix[label] = _short(record[key])
            self._bar.set_postfix(self._postfix, refresh=False)
            # update() redraws at most every mininterval (0.1 s), not at every step; close() draws the end.
            self._bar.update(record["step"] - self._bar.n)

    def log_eval(self, metrics: dict, step: int) -> None:
        """Write one eval line; keys without the ``eval/`` prefix get it added."""
        prefixed = {
            (k if str(k).startswith(_EVAL_PREFIX) else f"{_EVAL_PREFIX}{k}"): v
            for k, v in metrics.items()
            if k not in ("step", "time")
        }
        record = self._write(prefixed, step)
        self._evals[int(step)] = _eval_values(record)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            os.close(self._fd)
        finally:
            if self._bar is not None:
                self._bar.close()
            if self._wandb_run is not None:
                self._wandb_run.finish()

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --------------------------------------------------------------------------------------------
# reading / summary
# --------------------------------------------------------------------------------------------


def _metrics_file(run_dir: str | os.PathLike | None, metrics_path) -> Path:
    if metrics_path is not None:
        return Path(metrics_path)
    return Path(run_dir) / METRICS_FILENAME


def _jsonl_lines(path: Path) -> Iterator[tuple[str, Any]]:
    """(stripped line, parsed value or None if unparsable) for each non-blank line."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                yield line, json.loads(line)
            except json.JSONDecodeError:
                yield line, None


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """All records of a metrics JSONL file (or of ``<path>/metrics.jsonl`` for a run dir).

    Blank lines are skipped; unparsable lines (e.g. cut short by a crash) are skipped with a
    warning. A missing file gives an empty list.
    """
    p = Path(path)
    if p.is_dir():
        p = p / METRICS_FILENAME
    if not p.is_file():
        return []
    out: list[dict] = []
    bad = 0
    for _, rec in _jsonl_lines(p):
        if rec is None:
            bad += 1
        elif isinstance(rec, dict):
            out.append(rec)
    if bad:
        warnings.warn(f"{p}: skipped {bad} unparsable line(s)", stacklevel=2)
    return out


def _is_eval(rec: dict) -> bool:
    return any(str(k).startswith(_EVAL_PREFIX) for k in rec)


def _eval_values(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if str(k).startswith(_EVAL_PREFIX)}


def _named(error: OSError, path: Path) -> OSError:
    """``error`` naming ``path`` when it names no file (a failed ``write`` names none)."""
    if error.filename or error.errno is None:
        return error
    return OSError(error.errno, error.strerror, str(path))


def _split(records: Iterable[dict]) -> tuple[list[dict], list[dict]]:
    train, evals = [], []
    for r in records:
        if _is_eval(r):
            evals.append(r)
        elif "step" in r:
            train.append(r)
    return train, evals


def _finite(v: Any) -> bool:
    return _is_number(v) and math.isfinite(v)


def write_summary(
    run_dir: str | os.PathLike,
    *,
    steps_done: int,
    wall_time_s: float,
    metrics_path=None,
    extra: dict | None = None,
) -> dict:
    """Write ``<run_dir>/summary.json`` atomically and return it.

    ``final``: the numeric values of the last training line. ``best``: max ``reward/mean`` and
    min ``loss`` over training lines, and for every ``eval/*`` key its max over eval lines (min
    when the key name contains "loss"). ``best_step`` gives the step each best value came from.
    ``extra`` entries are merged in at top level.
    """
    run_dir = Path(run_dir)
    records = read_metrics(_metrics_file(run_dir, metrics_path))
    train, evals = _split(records)

    final: dict[str, Any] = {}
    if train:
        final = {k: v for k, v in train[-1].items() if _is_number(v)}

    best: dict[str, Any] = {}
    best_step: dict[str, Any] = {}

    def consider(key: str, rec: dict, maximize: bool) -> None:
        v = rec.get(key)
        if not _finite(v):
            return
        if key not in best or (v > best[key] if maximize else v < best[key]):
            best[key] = v
            best_step[key] = rec.get("step")

    for rec in train:
        consider("reward/mean", rec, True)
        consider("loss", rec, False)
    for rec in evals:
        for k in rec:
            if str(k).startswith(_EVAL_PREFIX):
                consider(k, rec, "loss" not in str(k).lower())

    summary: dict[str, Any] = {
        "steps_done": int(steps_done),
        "wall_time_s": float(wall_time_s),
        "final": final,
        "best": best,
        "best_step": best_step,
    }
    if extra:
        summary.update(_to_jsonable(dict(extra)))

    run_dir.mkdir(parents=True, exist_ok=True)
    out = run_dir / SUMMARY_FILENAME
    tmp = out.with_name(out.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(summary, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except OSError as e:  # e.g. a full disk: no partial summary.json(.tmp) is left
        tmp.unlink(missing_ok=True)
        raise _named(e, out) from None
    return summary


# --------------------------------------------------------------------------------------------
# plot
# --------------------------------------------------------------------------------------------


def plot_reward_curve(
    run_dir: str | os.PathLike,
    *,
    metrics_path=None,
    out_name: str = "reward_curve.png",
) -> Path | None:
    """Plot ``reward/mean`` vs step (with a +/- ``reward/std`` band) and eval accuracy points.

    Eval keys whose name contains "acc" are drawn as points on a second y axis. Uses the Agg
    canvas directly, so no display and no change to the global matplotlib backend. Returns the
    PNG path, or None when there are no training lines with ``reward/mean``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    run_dir = Path(run_dir)
    records = read_metrics(_metrics_file(run_dir, metrics_path))
    train, evals = _split(records)
    train = [r for r in train if _finite(r.get("reward/mean")) and _is_number(r.get("step"))]
    if not train:
        return None
    train.sort(key=lambda r: r["step"])
    steps = [r["step"] for r in train]
    mean = [r["reward/mean"] for r in train]

    fig = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(steps, mean, color="tab:blue", lw=1.5, label="reward/mean", marker="." if len(steps) < 50 else None)
    if all(_finite(r.get("reward/std")) for r in train):
        lo = [m - r["reward/std"] for m, r in zip(mean, train)]
        hi = [m + r["reward/std"] for m, r in zip(mean, train)]
        ax.fill_between(steps, lo, hi, color="tab:blue", alpha=0.2, lw=0, label="\u00b1 reward/std")
    ax.set_xlabel("step")
    ax.set_ylabel("reward")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()

    acc_keys = sorted(
        {k for r in evals for k in r if k.startswith(_EVAL_PREFIX) and "acc" in k.lower()}
    )
    if acc_keys:
        ax2 = ax.twinx()
        colors = ["tab:red", "tab:green", "tab:purple", "tab:orange", "tab:brown"]
        for i, key in enumerate(acc_keys):
            pts = [(r["step"], r[key]) for r in evals if _finite(r.get(key)) and _is_number(r.get("step"))]
            if not pts:
                continue
            pts.sort()
            ax2.plot(
                [p[0] for p in pts], [p[1] for p in pts],
                ls="--", marker="o", color=colors[i % len(colors)], label=key,
            )
        ax2.set_ylabel("eval accuracy")
        ys = [v for line in ax2.get_lines() for v in line.get_ydata()]
        if ys and 0.0 <= min(ys) and max(ys) <= 1.0:
            ax2.set_ylim(-0.02, 1.02)  # accuracies on their natural scale, not auto-zoomed
        h2, l2 = ax2.get_legend_handles_labels()
        handles += h2
        labels += l2
    ax.legend(handles, labels, loc="best", fontsize="small")
    ax.set_title(run_dir.name or "reward")
    fig.tight_layout()

    out = run_dir / out_name
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(".tmp_" + out.name)
    try:
        fig.savefig(tmp, format="png")
        os.replace(tmp, out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _named(e, out) from None
    return out


# --------------------------------------------------------------------------------------------
# console text
# --------------------------------------------------------------------------------------------


def _fmt_duration(seconds: float) -> str:
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    if h:
        return f"{h}h{m:02d}m{s:02d}s"
    if m:
        return f"{m}m{s:02d}s"
    return f"{seconds:.1f}s"


def format_summary(summary: dict) -> str:
    """Short multi-line console text for a summary dict from :func:`write_summary`."""
    lines = [f"steps done: {summary.get('steps_done', '?')}"]
    wt = summary.get("wall_time_s")
    if _is_number(wt):
        lines.append(f"wall time:  {_fmt_duration(wt)}")
    final = summary.get("final") or {}
    best = summary.get("best") or {}
    best_step = summary.get("best_step") or {}

    def with_step(key: str) -> str:
        s = best_step.get(key)
        return f" (step {s})" if s is not None else ""

    if "reward/mean" in final or "reward/mean" in best:
        parts = []
        if "reward/mean" in final:
            parts.append(f"final {_short(final['reward/mean'])}")
        if "reward/mean" in best:
            parts.append(f"best {_short(best['reward/mean'])}{with_step('reward/mean')}")
        lines.append("reward/mean: " + ", ".join(parts))
    if "loss" in final:
        lines.append(f"loss:        final {_short(final['loss'])}")
    # Scores only: counts and lengths (eval/num_prompts, eval/*failures, eval/*length) are not "best".
    scores = (k for k in best if k.startswith(_EVAL_PREFIX)
              and not any(w in k for w in ("num_prompts", "failures", "length")))
    for k in sorted(scores):
        lines.append(f"{k}: best {_short(best[k])}{with_step(k)}")
    before = summary.get("heldout_accuracy_before")
    after = summary.get("heldout_accuracy_after")
    if before is not None or after is not None:
        txt = "heldout accuracy: " + " -> ".join(
            "n/a" if v is None else _short(v) for v in (before, after)
        )
        if _is_number(before) and _is_number(after):
            txt += f" ({after - before:+.3g})"
        lines.append(txt)
    return "\n".join(lines)
