"""A user-written reward: any importable function ``(prompt, completion, **row) -> float | dict``."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


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

    def __call__(self, completion: str, row: dict[str, Any], prompt: str | None = None) -> Any:
        if prompt is None:
            prompt = row.get("prompt", row.get("question", ""))
        fields = {k: v for k, v in row.items() if k not in ("prompt", "completion")}
        result = self.fn(prompt, completion, **{**fields, **self.kwargs})
        return result if isinstance(result, Mapping) else {"reward": result}
