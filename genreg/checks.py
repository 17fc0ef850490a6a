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
        try:
            p.encode("utf-8")
        except UnicodeEncodeError as err:  # e.g. undecodable bytes on a command line
            raise ValueError(f"{name} {i} is not valid text (UTF-8): {err.reason} at character {err.start}") from None
        if not p.strip():
            raise ValueError(f"{name} {i} is empty: describe what to generate, e.g. 'a red circle on the left'")
    return items


def require_positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive whole number, got {value!r}")
    return value


def require_nonnegative(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def require_seed(value: int, name: str = "seed") -> int:
    """A whole number a torch generator takes: 0 <= seed < 2**63."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        raise ValueError(f"{name} must be a whole number from 0 to 2**63 - 1, got {value!r}")
    return value


def require_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"{name} {value!r} is unknown; choose one of {', '.join(choices)}")
    return value
