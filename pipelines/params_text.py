"""Edits of params.yaml as text, so that its comments (why each setting is what it is) and its layout stay.

The file is two levels deep (``section:`` then ``  key: value  # comment``); only values at those levels are edited.
Callers validate the result with :func:`lorax.config.load_params` before replacing the file.
"""

from __future__ import annotations

import re

import yaml

from lorax.config import ConfigError


def flow(value: object) -> str:
    """``value`` as one line of YAML flow style (``[a, b]``, ``{prev: a}``, a quoted string only when needed)."""
    return yaml.safe_dump([value], default_flow_style=True, width=10**6).strip()[1:-1]


def section_line(lines: list[str], section: str) -> int:
    """Index of the top-level line ``section:`` of a block section (a comment may follow; not a flow mapping)."""
    for k, ln in enumerate(lines):
        if re.match(rf"^{re.escape(section)}\s*:\s*(#.*)?$", ln.rstrip("\n")):
            return k
    raise ConfigError(f"no block '{section}:' at the top level of the settings file; add the section")


def block_span(lines: list[str], section: str) -> tuple[int, int | None, str | None]:
    """``(header, last, indent)`` of a block section: its ``section:`` line, its last indented line (a nested line
    of its last entry included; comments and blank lines after it belong to the next section) and the indent of
    its entries (``last`` and ``indent`` None when the block is empty)."""
    start = section_line(lines, section)
    last, indent = None, None
    for k in range(start + 1, len(lines)):
        ln = lines[k]
        if ln.strip() == "" or ln.lstrip().startswith("#"):
            continue
        if not ln[0].isspace():
            break
        if indent is None:
            indent = ln[: len(ln) - len(ln.lstrip())]
        last = k
    return start, last, indent


def set_value(lines: list[str], dotted: str, value: object, comment: str | None = None) -> None:
    """Set ``section.key`` to ``value`` in place; its comment stays in its column (``comment``: a new one)."""
    section, _, key = dotted.partition(".")
    start, last, indent = block_span(lines, section)
    for k in range(start + 1, (last or start) + 1):
        m = re.match(rf"^({re.escape(indent or '')}{re.escape(key)}\s*:\s*)(.*?)(\s+#.*)?$", lines[k].rstrip("\n"))
        if not m:
            continue
        head, old, tail = m.group(1), m.group(2), m.group(3) or ""
        text = head + flow(value)
        note = f"# {comment}" if comment is not None else tail.lstrip()
        if note:
            column = len(head) + len(old) + len(tail) - len(tail.lstrip())
            text += " " * max(2, column - len(text)) + note
        lines[k] = text + "\n"
        return
    raise ConfigError(f"no '{key}:' in the '{section}:' section of the settings file; add it")


def replace_block(lines: list[str], section: str, entries: list[str]) -> None:
    """Replace the entries of block ``section`` by ``entries`` (lines without indent), in place."""
    start, last, indent = block_span(lines, section)
    indent = indent or "  "
    lines[start + 1:(last if last is not None else start) + 1] = [f"{indent}{e}\n" for e in entries]
