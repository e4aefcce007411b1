"""benchmarks/README.md indexes benchmarks/: every script and document there has a row, every row names a file that
is there, and a removed experiment's row names a commit that holds it (the citations of ``benchmarks.X`` elsewhere
are checked by tests/test_layering.py, ``test_cited_documents_are_in_the_repository``)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "benchmarks"
REMOVED = "Removed one-off experiments"
ROW = re.compile(r"^\| `(?:benchmarks/)?([\w.-]+\.(?:py|md))` \|(.*)$", re.M)  # a row: | `FILE` | ...


def index() -> tuple[dict[str, str], dict[str, str]]:
    """The index's rows, ``{file: rest of the row}``: the files it lists as here, and those it lists as removed."""
    text = (BENCH / "README.md").read_text()
    assert REMOVED in text, f"benchmarks/README.md has no {REMOVED!r} section"
    here, removed = text.split(REMOVED, 1)
    return dict(ROW.findall(here)), dict(ROW.findall(removed))


def test_every_file_has_a_row() -> None:
    listed, _ = index()
    files = sorted(p.name for p in BENCH.iterdir() if p.suffix in {".py", ".md"})
    assert [f for f in files if f not in listed] == []


def test_every_row_names_a_file_that_is_there() -> None:
    listed, removed = index()
    assert [f for f in listed if not (BENCH / f).is_file()] == []
    assert [f for f in removed if (BENCH / f).exists()] == []


def test_a_removed_experiment_names_a_commit_that_holds_it() -> None:
    _, removed = index()
    assert removed, "the index lists no removed experiment: keep the section's table, or drop this test"
    for name, rest in removed.items():
        commits = re.findall(r"\b[0-9a-f]{7,40}\b", rest)
        assert commits, f"{name}: no commit named"
        known = [c for c in commits if subprocess.run(["git", "cat-file", "-e", f"{c}^{{commit}}"], cwd=REPO,
                                                      capture_output=True).returncode == 0]
        for c in known:  # a shallow clone may not have it: then only the naming is checked
            assert subprocess.run(["git", "cat-file", "-e", f"{c}:benchmarks/{name}"], cwd=REPO,
                                  capture_output=True).returncode == 0, f"{name} is not in commit {c}"
