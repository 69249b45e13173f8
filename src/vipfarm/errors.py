"""The one base of vipfarm's own errors.

Theory of operation
-------------------
Every error that vipfarm raises on purpose derives from `VipfarmError`, and its text names the
bad value and the fix, so that it can be shown to the operator as it is, without a traceback.
Anything else (an `OSError`, a `KeyError`) is a bug or an unforeseen state of the host, and its
traceback is what the reader needs. Each part of the project keeps its own subclass
(`ConfigError`, `ControlError`, `DatapathError`, `LabError`, ...), so that a caller can still
tell them apart; catching `VipfarmError` catches exactly the errors meant for a person.
"""

from __future__ import annotations

__all__ = ["VipfarmError"]


class VipfarmError(Exception):
    """Every error the project raises on purpose, with a text that names the bad value and the
    fix."""
