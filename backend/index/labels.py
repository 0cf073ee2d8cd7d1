"""Automatic labels: a short name for every feature from the tokens it fires on most, so a forest row says
something at a glance before anyone annotates it (a person's label always takes its place).

The tokens are those at the strongest position of each of the feature's top examples (rank order), which the
index stores anyway: the writer takes them from the contexts as it writes them, and migration 0004 derived
them from the stored examples of runs indexed before. Pure Python, no database.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

AUTO_LABEL_TOKENS = 3  # distinct tokens named
AUTO_LABEL_MAX_CHARS = 80  # the column holds 200
_TOKEN_CHARS = 24
_SHOWN = {"\n": "↵", "\t": "⇥", " ": "␣", "\r": "↵"}


def display_token(token: str) -> str:
    """A token as a label shows it: surrounding spaces dropped (" Paris" and "Paris" are one), whitespace
    made visible, control characters and NUL (which PostgreSQL text refuses) dropped, long ones cut."""
    stripped = token.strip()
    if not stripped:
        shown = "".join(_SHOWN.get(c, "") for c in token[:3])
    else:
        shown = "".join(c for c in stripped if c.isprintable())
    if len(shown) > _TOKEN_CHARS:
        shown = shown[: _TOKEN_CHARS - 1] + "…"
    return shown


def auto_label(activating_tokens: Iterable[str]) -> str | None:
    """The most frequent of the tokens (ties: the one met first, i.e. on the stronger example), up to
    AUTO_LABEL_TOKENS of them joined by " · "; None when there are none."""
    counts = Counter(shown for shown in map(display_token, activating_tokens) if shown)
    if not counts:
        return None
    # Counter keeps first-seen order among equal counts (most_common sorts stably).
    names = [name for name, _ in counts.most_common(AUTO_LABEL_TOKENS)]
    label = " · ".join(names)
    return label if len(label) <= AUTO_LABEL_MAX_CHARS else label[: AUTO_LABEL_MAX_CHARS - 1] + "…"
