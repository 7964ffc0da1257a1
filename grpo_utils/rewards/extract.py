"""Linear-time helpers to pull the final answer out of model text (no backtracking regexes:
completions can be long and adversarial)."""

from __future__ import annotations


def last_tag_content(text: str, tag: str = "answer") -> str | None:
    """Content of the last ``<tag>...</tag>`` pair (case-insensitive), or None."""
    lower = text.lower()
    close = lower.rfind(f"</{tag}>")
    if close < 0:
        return None
    opening = f"<{tag}>"
    start = lower.rfind(opening, 0, close)
    if start < 0:
        return None
    return text[start + len(opening):close]
