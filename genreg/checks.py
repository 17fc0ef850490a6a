"""Input checks shared by the API, CLI and app: each raises ValueError naming the problem and the fix."""

from __future__ import annotations

import math


def require_prompts(prompts: str | list[str], name: str = "prompt") -> list[str]:
    """Returns the prompts as a list; refuses none, non-strings, and empty or blank ones."""
    items = [prompts] if isinstance(prompts, str) else list(prompts)
    if not items:
        raise ValueError(f"no {name} given: pass at least one text {name}")
    for i, p in enumerate(items):
        if not isinstance(p, str):
            raise ValueError(f"{name} {i} is a {type(p).__name__}, not text")
        if not p.strip():
            raise ValueError(f"{name} {i} is empty: describe what to generate, e.g. 'a red circle on the left'")
    return items


def require_positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive whole number, got {value!r}")
    return value


def require_nonnegative(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or math.isnan(value) or value < 0:
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    return float(value)
