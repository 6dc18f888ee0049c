"""Model families, each in its own folder, registering itself here on import: its patch
rules (``patching.register``) and its fine-tuning harness (a :class:`Family`, found by
:func:`family_for`). Nothing outside a family's folder knows its names or classes."""

from .base import Family, computing_at, computing_model, family_for, family_of, register_family
from . import mace, sevennet  # noqa: E402,F401  (register)

__all__ = ["Family", "computing_at", "computing_model", "family_for", "family_of", "register_family"]
