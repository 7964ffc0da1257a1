"""Components for GRPO-family RL training of language models on TorchRL.

The Python API (``GRPOTrainer``, ``GRPOConfig``, ``SimplePromptDataset``) is importable from here;
it loads on first use, so importing a component does not pull in the whole training stack.
"""

_API = ("GRPOConfig", "GRPOTrainer", "SimplePromptDataset")
__all__ = list(_API)


def __getattr__(name: str):
    if name in _API:
        from grpo_utils import api

        return getattr(api, name)
    raise AttributeError(f"module 'grpo_utils' has no attribute {name!r}")
