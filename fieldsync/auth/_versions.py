"""The client-version gate: one comparison for HTTP headers and the v1 `hello` alike."""

from __future__ import annotations

import itertools
from collections.abc import Mapping

__all__ = ["required_version", "version_tuple"]


def version_tuple(version: str) -> tuple[int, ...]:
    """'2.10.1-beta' -> (2, 10, 1): compare versions numerically, not as strings."""
    parts = []
    for piece in version.split("."):
        digits = "".join(itertools.takewhile(str.isdigit, piece))
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def required_version(minimums: Mapping[str, str], platform: str, version: str) -> str | None:
    """The minimum version `platform` must upgrade to, or None when `version` is recent enough
    or the platform has no minimum. Platforms are named exactly as in the setting, as `hello`
    names them; a missing or unreadable version counts as 0, so a client of a gated platform
    cannot pass by leaving it out."""
    minimum = minimums.get(platform.strip())
    if minimum and version_tuple(version.strip()) < version_tuple(minimum):
        return minimum
    return None
