""""did you mean" for names the user mistyped."""

from __future__ import annotations

import difflib


def suggest(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=3)
    return f" (did you mean {', '.join(close)}?)" if close else ""
