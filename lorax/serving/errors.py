"""The error of the serving commands that is the user's to fix (no inputs, no model, no registry)."""

from __future__ import annotations


class ServingError(ValueError):
    """Nothing could be done (no inputs, no model, no registry); the message says what to fix."""
