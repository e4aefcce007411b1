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


_LINE = re.compile(r"^(\s*)([^\s#:][^:#]*?)\s*:[ \t]*(.*?)([ \t]*#.*)?$")


def _parts(line: str) -> tuple[str, str, str, str] | None:
    """(indent, key, value, comment) of a ``key: value  # comment`` line (value '' for a block's header)."""
    m = _LINE.match(line.rstrip("\n"))
    if m is None:
        return None
    value, comment = m.group(3), (m.group(4) or "").lstrip()
    if comment and value and not value[-1].isspace() and not m.group(4)[0].isspace():
        value, comment = value + m.group(4), ""  # a '#' inside the value (no space before it): not a comment
    return m.group(1), m.group(2), value, comment


def _entry(lines: list[str], start: int, end: int, indent: str | None, key: str) -> int | None:
    """Index of the line ``<indent>key:`` among ``lines[start:end]`` (``indent`` None: the top level)."""
    for k in range(start, end):
        parts = _parts(lines[k])
        if parts and parts[1] == key and parts[0] == (indent or ""):
            return k
    return None


def _block_end(lines: list[str], header: int) -> tuple[int, str | None]:
    """(one past the last line of the block under ``lines[header]``, the indent of its entries)."""
    own = len(lines[header]) - len(lines[header].lstrip())
    end, indent = header + 1, None
    for k in range(header + 1, len(lines)):
        ln = lines[k]
        if ln.strip() == "" or ln.lstrip().startswith("#"):
            continue
        if len(ln) - len(ln.lstrip()) <= own:
            break
        indent = indent or ln[: len(ln) - len(ln.lstrip())]
        end = k + 1
    return end, indent


def _with_value(line: str, value: object) -> str:
    """``line`` (``key: old  # comment``) with ``value`` in flow style; the comment stays in its column."""
    parts = _parts(line)
    assert parts is not None
    head = f"{parts[0]}{parts[1]}: "
    tail = parts[3]
    text = head + flow(value)
    if tail:
        column = line.find(tail)
        text += " " * max(2, column - len(text)) + tail
    return text + "\n"


def set_path(lines: list[str], dotted: str, value: object) -> None:
    """Set the setting ``dotted`` (any depth) to ``value`` in place, keeping every comment. A block section that
    the key replaces whole becomes one flow line; a flow value on the way (``kwargs: {}``, ``spectrum: null``) is
    rewritten with the key set in it; a key the file does not state is added at the end of its section."""
    parts = dotted.split(".")
    start, end, indent = 0, len(lines), None
    for i, part in enumerate(parts):
        k = _entry(lines, start, end, indent, part)
        last = i == len(parts) - 1
        if k is None:  # not stated: add it (and the sections it needs) at the end of its section
            nested: object = value
            for p in reversed(parts[i + 1:]):
                nested = {p: nested}
            pad = indent if indent is not None else ""
            if indent is None and start > 0:  # an empty block: indent below its header
                pad = lines[start - 1][: len(lines[start - 1]) - len(lines[start - 1].lstrip())] + "  "
            if end and not lines[end - 1].endswith("\n"):
                lines[end - 1] += "\n"
            lines.insert(end, f"{pad}{part}: {flow(nested)}\n")
            return
        inline = (_parts(lines[k]) or ("", "", "", ""))[2]
        block_end, child_indent = _block_end(lines, k)
        if last:
            lines[k:block_end] = [_with_value(lines[k], value)]
            return
        if inline:  # a flow value on the way: set the rest of the key inside it
            node = yaml.safe_load(inline)
            node = node if isinstance(node, dict) else {}
            cur = node
            for p in parts[i + 1:-1]:
                if not isinstance(cur.get(p), dict):
                    cur[p] = {}
                cur = cur[p]
            cur[parts[-1]] = value
            lines[k] = _with_value(lines[k], node)
            return
        start, end = k + 1, block_end
        indent = child_indent if child_indent is not None else None
        if indent is None:  # an empty block
            end = k + 1
