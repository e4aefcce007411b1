"""The base of every settings section: a pydantic model that forbids unknown keys (a typo fails at start with the
key's dotted path) and validates assignments. Its own module so that the sections kept beside their code
(:mod:`lorax.models.config`, :mod:`lorax.detect.config`) and :mod:`lorax.config`, which assembles them into
``Params``, share it without an import circle."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())
