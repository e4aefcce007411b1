"""The house rules of the code base, checked on the source (imports inside functions included):

* ``lorax/`` is the library: it imports nothing from MLflow, Prefect, DVC, ``pipelines`` or ``benchmarks``;
* ``pipelines/`` drives the library and never imports ``benchmarks/``, which sits on top of both (and is not
  installed: it runs from a checkout);
* no import circle anywhere in ``lorax/``, ``pipelines/`` and ``benchmarks/``;
* no module over ~350 lines without a reason written at its top.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FORBIDDEN_IN_LIBRARY = ("mlflow", "prefect", "dvc", "pipelines", "benchmarks")
# Entry-point shims: a module that only runs another one under ``python -m`` (no import, never imported itself).
ENTRY_SHIMS = {"lorax/continual/ddp.py": "pipelines.ddp", "lorax/cli.py": "pipelines.cli"}
MAX_LINES = 350
PACKAGES = ("lorax", "pipelines", "benchmarks")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}


def imports(path: Path, name: str) -> set[str]:
    """Every module ``path`` imports (absolute names; relative imports resolved), at any depth of the file."""
    out: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = package.split(".")
                pkg = pkg[: len(pkg) - node.level + 1]
                base = ".".join(pkg + ([node.module] if node.module else []))
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


def project_graph() -> dict[str, set[str]]:
    mods = modules()

    def owner(name: str) -> str | None:
        while name:
            if name in mods:
                return name
            name = name.rpartition(".")[0]
        return None

    graph = {}
    for name, path in mods.items():
        graph[name] = {o for i in imports(path, name) if (o := owner(i)) and o != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_library_imports_no_orchestration() -> None:
    bad = []
    for name, path in modules().items():
        if name.split(".")[0] != "lorax":
            continue
        bad += [f"{path.relative_to(REPO)}: {i}" for i in sorted(imports(path, name))
                if i.split(".")[0] in FORBIDDEN_IN_LIBRARY]
    assert bad == []


def test_pipelines_import_no_benchmarks() -> None:
    bad = [f"{path.relative_to(REPO)}: {i}" for name, path in modules().items() if name.split(".")[0] == "pipelines"
           for i in sorted(imports(path, name)) if i.split(".")[0] == "benchmarks"]
    assert bad == []


def test_the_scan_covers_benchmarks() -> None:
    """The circle check sees benchmarks' own imports (a circle through it would be found)."""
    graph = project_graph()
    assert "benchmarks.detect_ablation" in graph
    assert "benchmarks.detect_ablation_tables" in graph["benchmarks.detect_ablation"]


def test_entry_shims_only_forward() -> None:
    """The old ``-m lorax.continual.ddp`` and ``-m lorax.cli`` spellings run their pipelines module by name, hold no
    code, and nothing imports them; and they still work."""
    graph = project_graph()
    for rel, target in ENTRY_SHIMS.items():
        tree = ast.parse((REPO / rel).read_text())
        body = [n for n in tree.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
        assert len(body) == 1 and isinstance(body[0], ast.If) and "__main__" in ast.unparse(body[0].test)
        assert repr(target) in ast.unparse(body[0])
        shim = module_name(REPO / rel)
        assert not [m for m, deps in graph.items() if shim in deps]


def test_no_import_circles() -> None:
    assert cycles(project_graph()) == []


def test_the_checker_sees_circles() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_long_modules_say_why() -> None:
    """A module over MAX_LINES lines says why in its docstring: "(Over 350 lines: <the reason>)"."""
    long = []
    for path in modules().values():
        lines = path.read_text().splitlines()
        doc = (ast.get_docstring(ast.parse("\n".join(lines))) or "").lower()
        if len(lines) > MAX_LINES and f"over {MAX_LINES} lines:" not in doc:
            long.append(f"{path.relative_to(REPO)} ({len(lines)} lines)")
    assert long == []


def test_old_command_spelling_runs_the_command() -> None:
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "lorax.cli", "stream", "--help"], capture_output=True, text=True,
                         timeout=120, cwd=REPO)
    assert res.returncode == 0 and "add" in res.stdout


def sections(path: Path) -> list[str]:
    """A Markdown file's sections (split at headings outside code blocks); any other file whole."""
    text = path.read_text(errors="ignore")
    if path.suffix != ".md":
        return [text]
    out: list[str] = []
    cur: list[str] = []
    fence = False
    for line in text.splitlines():
        if line.startswith("```"):
            fence = not fence
        elif not fence and line.startswith("#"):
            out.append("\n".join(cur))
            cur = []
        cur.append(line)
    return out + ["\n".join(cur)]


def git(*args: str) -> tuple[int, str]:
    import subprocess

    res = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)
    return res.returncode, res.stdout.strip()


def held_by_a_named_commit(text: str, rel: str) -> bool:
    """``text`` names a commit ("commit abc1234") that holds ``rel`` (in a shallow clone that lacks the commit, the
    naming is all that can be checked)."""
    import re

    for c in set(re.findall(r"\bcommit\s+([0-9a-f]{7,40})\b", text)):
        if git("cat-file", "-e", f"{c}:{rel}")[0] == 0:
            return True
        unknown = git("cat-file", "-e", f"{c}^{{commit}}")[0] != 0
        if unknown and git("rev-parse", "--is-shallow-repository")[1] == "true":
            return True
    return False


def test_cited_documents_are_in_the_repository() -> None:
    """What the code and docs cite (docs/*.md, benchmarks/*.md, upper-case top-level names, and the benchmark scripts,
    ``benchmarks/NAME.py`` or ``benchmarks.NAME``) is a file of the repo, so a clone can follow every reference. A
    removed benchmark may still be cited where its figures are recorded when the same section names a commit that
    holds it ("script removed; run it at commit abc1234")."""
    import re
    import subprocess

    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    cite = re.compile(r"(?<![\w/.-])((?:docs|benchmarks)/[\w.-]+\.md|[A-Z][A-Z_-]*\.md)\b")
    bench = re.compile(r"(?<![\w/.-])benchmarks(?:/([a-z]\w*)\.py\b|\.([a-z]\w*))")
    missing = set()
    for rel in files:
        path = REPO / rel
        if path.suffix not in {".py", ".md", ".yaml", ".toml", ".txt", ""} or not path.is_file():
            continue
        for section in sections(path):
            for ref in cite.findall(section):
                if not (REPO / ref).is_file():
                    missing.add(f"{rel}: {ref}")
            for script in {a or b for a, b in bench.findall(section)}:
                ref = f"benchmarks/{script}.py"
                if not (REPO / ref).is_file() and not held_by_a_named_commit(section, ref):
                    missing.add(f"{rel}: {ref}")
    assert sorted(missing) == []


def test_the_citation_check_sees_a_removed_script() -> None:
    """A cited benchmark that is gone passes only where its section names a commit that holds it."""
    head, gone = git("rev-parse", "--short", "HEAD")[1], "nowhere"
    assert not held_by_a_named_commit(f"`python -m benchmarks.{gone}`, at commit {head}", f"benchmarks/{gone}.py")
    assert not held_by_a_named_commit("`python -m benchmarks.realworld`, no commit named", "benchmarks/realworld.py")
    assert held_by_a_named_commit(f"script removed; run it at commit {head}", "benchmarks/realworld.py")


def test_tests_import_no_other_test_module() -> None:
    """Helpers that several test modules use live in tests/helpers.py (or fixtures in a conftest), never in a test
    module that another one imports."""
    bad = []
    for path in (REPO / "tests").rglob("*.py"):
        name = module_name(path)
        bad += [f"{path.relative_to(REPO)}: {i}" for i in sorted(imports(path, name))
                if i.startswith("tests.") and any(part.startswith("test_") for part in i.split("."))]
    assert bad == []


def test_only_the_two_packages_are_installed() -> None:
    """pyproject installs ``lorax`` and ``pipelines``; ``benchmarks`` (a generic name) runs from a checkout."""
    import tomllib

    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    assert sorted(include) == ["lorax*", "pipelines*"]
