"""A user-written reward: any importable function ``(prompt, completion, **row) -> float | dict``,
or with ``batched`` one ``(prompts, completions, **columns) -> list[float | dict]``."""

from __future__ import annotations

import importlib
import types
from collections.abc import Callable, Mapping
from typing import Any

#: Objects handed over in memory (the Python API's rewards: a notebook's function, a reward model
#: instance), addressable by dotted path in this process only. Ray actors import their rewards,
#: so they cannot see these; the API saves or refuses what they would need.
IN_PROCESS = types.SimpleNamespace()
#: The dotted-path prefix of what :data:`IN_PROCESS` holds (e.g. a ``reward_model.path``).
IN_PROCESS_PREFIX = f"{__name__}.IN_PROCESS."


def register_in_process(obj: Any, name: str) -> str:
    """Keep ``obj`` under ``name`` and return the dotted path that finds it in this process."""
    setattr(IN_PROCESS, name, obj)
    return f"{__name__}.IN_PROCESS.{name}"


def importable_path(fn: Any) -> str | None:
    """``fn``'s dotted path when importing it gives ``fn`` back in a fresh process (not a lambda,
    closure or ``__main__`` function), else None."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not module or module == "__main__" or "<" in qualname:
        return None
    try:
        return f"{module}.{qualname}" if import_object(f"{module}.{qualname}") is fn else None
    except Exception:
        return None


def import_object(path: str) -> Any:
    """The object at dotted ``path`` (``pkg.module.function`` or ``pkg.module.Class.method``)."""
    if not isinstance(path, str) or "." not in path.strip("."):
        raise ValueError(f"{path!r} is not a dotted path like 'my_pkg.rewards.my_reward'")
    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):  # the longest importable module prefix
        module_name = ".".join(parts[:cut])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name is None or not (module_name == e.name or module_name.startswith(e.name + ".")):
                raise  # the module exists but fails on an import of its own
            continue
        for attr in parts[cut:]:
            try:
                obj = getattr(obj, attr)
            except AttributeError:
                raise ValueError(f"{path!r}: module {module_name!r} has no attribute "
                                 f"{'.'.join(parts[cut:])!r}") from None
        return obj
    raise ValueError(f"{path!r}: no module {parts[0]!r} can be imported")


class CallableReward:
    """Calls ``fn(prompt, completion, **row, **kwargs)``: a number is the reward; a dict must hold
    ``reward`` and may add sub-scores (numbers; anything else is dropped). ``prompt`` is what the
    caller passes (the rendered policy prompt), else ``row["prompt"]`` / ``row["question"]``; the
    row's own ``prompt`` and ``completion`` fields are not passed again as keywords. ``kwargs``
    are fixed extra keyword arguments from the config (they win over row fields of that name)."""

    keys = ("reward",)

    def __init__(self, target: str, kwargs: dict[str, Any] | None = None):
        fn = import_object(target)
        if not callable(fn):
            raise ValueError(f"{target!r} is not callable")
        self.target = target
        self.fn: Callable[..., Any] = fn
        self.kwargs = dict(kwargs or {})

    def batch(self, completions: list[str], rows: list[dict[str, Any]], prompts: list[str | None]) -> list[Any]:
        """``batched``: one call ``fn(prompts, completions, **columns, **kwargs)`` where each row
        field becomes a list (TRL's convention); returns one number or dict per completion."""
        prompts = [p if p is not None else row.get("prompt", row.get("question", "")) for p, row in zip(prompts, rows)]
        names = [k for k in rows[0] if k not in ("prompt", "completion")] if rows else []
        columns = {k: [row.get(k) for row in rows] for k in names}
        results = self.fn(prompts, completions, **{**columns, **self.kwargs})
        results = list(results)
        return [r if isinstance(r, Mapping) else {"reward": r} for r in results]

    def __call__(self, completion: str, row: dict[str, Any], prompt: str | None = None) -> Any:
        if prompt is None:
            prompt = row.get("prompt", row.get("question", ""))
        fields = {k: v for k, v in row.items() if k not in ("prompt", "completion")}
        result = self.fn(prompt, completion, **{**fields, **self.kwargs})
        return result if isinstance(result, Mapping) else {"reward": result}
