"""benchmarks.detect_ablation: the grid (one factor at a time), its runs, tables and resume, the
``lorax detect-ablation`` command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.detect_ablation import Variant, ablation_grid, main, parse_blocks, parse_rank_set, run_ablation
from pipelines.cli import main as lorax_main
from tests.helpers import PARAMS_YAML, tiny_params
from tests.detect.synth import CLI_TINY_DETECT as CLI_TINY
from tests.detect.synth import TINY_DETECT as TINY
from tests.detect.synth import make_zoo


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_zoo(tmp_path_factory.mktemp("ablation_zoo"), n_train=8, n_val=4, size=20)


@pytest.fixture(scope="module")
def extra(tmp_path_factory: pytest.TempPathFactory) -> Path:
    gens = {"far": ("stripes", 30.0, 1)}
    return make_zoo(tmp_path_factory.mktemp("ablation_extra"), n_train=2, n_val=3, size=20, seed=5, generators=gens)


def test_grid_follows_the_paper_tables_one_factor_at_a_time():
    params = tiny_params(None, **TINY)
    tables = ablation_grid(params)
    assert list(tables) == ["design", "blocks", "ranks"]
    ref = Variant("mole", "mlp", 1, 8, (4, 8, 16))
    design = tables["design"]
    assert [v.method for v in design[:4]] == ["probe", "shared", "separate", "mole"] and design[3] == ref
    assert {(v.method, v.where) for v in design[4:]} == {("shared", "attn"), ("shared", "both"), ("mole", "attn"),
                                                         ("mole", "both")}
    assert [v.blocks for v in tables["blocks"]] == [1, 2, 3, 4, 5, 0]
    assert ref in tables["blocks"] and ref in tables["ranks"]
    assert (16, (4, 8, 16)) in {(v.shared_rank, v.expert_ranks) for v in tables["ranks"]}
    # methods ignore what they do not use: one probe, a shared LoRA has no experts, separate has no shared rank
    assert Variant("probe", "attn", 5) == Variant("probe") and Variant("probe").slug == "probe"
    assert Variant("shared").expert_ranks == () and Variant("separate").shared_rank == 0
    assert Variant("mole", blocks=0).slug == "mole-mlp-ball-r8_4.8.16"
    small = ablation_grid(params, groups=["design"], methods=["mole", "probe", "mole"], where=["mlp"])
    assert small == {"design": [ref, Variant("probe")]}


@pytest.mark.parametrize("call, match", [
    (lambda p: parse_blocks("0"), ">= 1"),
    (lambda p: parse_blocks("last"), "'all'"),
    (lambda p: parse_rank_set("8-4/8"), "SHARED:E1"),
    (lambda p: parse_rank_set("0:4/8"), "shared rank >= 1"),
    (lambda p: ablation_grid(p, groups=["design", "heads"]), "unknown"),
    (lambda p: ablation_grid(p, methods=["moe"]), "unknown detector"),
    (lambda p: ablation_grid(p, groups=["blocks"], blocks=[]), "no variants"),
])
def test_bad_grid_input(call, match):
    with pytest.raises(ValueError, match=match):
        call(tiny_params(None, **TINY))


def test_run_writes_tables_and_resumes(zoo: Path, extra: Path, tmp_path: Path):
    params = tiny_params(None, **TINY)
    tables = ablation_grid(params, groups=["design", "ranks"], methods=["probe", "mole"], where=["mlp"],
                           ranks=["8:4/8/16"])  # the reference row is in both tables: trained once
    out = tmp_path / "abl"
    s = run_ablation(params, zoo, out, tables, seeds=[0, 1], extra_eval={"far": extra}, command="the command")
    assert s["complete"] and set(s["rows"]) == {"probe", "mole-mlp-b1-r8_4.8.16"}
    row = s["rows"]["mole-mlp-b1-r8_4.8.16"]
    assert row["map"]["n"] == 2 and 0 <= row["map"]["mean"] <= 100 and row["map"]["std"] >= 0
    assert set(row["ap"]) == {"checker_b", "stripes"} and row["extra"]["far"]["map"]["n"] == 2
    assert s["rows"]["probe"]["trainable_params"] < row["trainable_params"]
    runs = sorted(p.parent.name + "/" + p.name for p in (out / "runs").glob("*/seed*"))
    assert len(runs) == 4 and all((out / "runs" / r / "metrics.json").is_file() for r in runs)
    saved = json.loads((out / "ablation.json").read_text())
    assert saved["tables"] == {"design": ["probe", "mole-mlp-b1-r8_4.8.16"], "ranks": ["mole-mlp-b1-r8_4.8.16"]}
    assert json.loads((out / "runs" / "probe" / "seed0" / "metrics.json").read_text())["robustness"] == \
        {"blur": {}, "jpeg": {}}  # robustness off by default
    md = (out / "ablation.md").read_text()
    assert "## Adapter design" in md and "## LoRA ranks" in md and "`the command`" in md
    assert "| linear probe |" in md and "| 8 : 4/8/16 |" in md and "mAP far" in md and "± " in md
    assert "Ordering by unseen mAP" in md and "Chance level" in md
    assert saved["chance_map"]["unseen"] == pytest.approx(50.0)  # the synthetic zoo is balanced
    assert saved["chance_map"]["far"] == pytest.approx(50.0)

    # a second run reuses every finished run; a changed setting re-runs
    stamp = {r: (out / "runs" / r / "metrics.json").stat().st_mtime_ns for r in runs}
    again = run_ablation(params, zoo, out, tables, seeds=[0, 1], extra_eval={"far": extra})
    assert again["rows"]["probe"]["map"] == s["rows"]["probe"]["map"]
    assert all((out / "runs" / r / "metrics.json").stat().st_mtime_ns == t for r, t in stamp.items())
    other = run_ablation(params, zoo, tmp_path / "other", {"design": [Variant("probe")]}, seeds=[1],
                         extra_eval={"far": extra}, runs_dir=out / "runs")  # sharing the runs folder
    assert other["rows"]["probe"]["map"]["mean"] == json.loads(
        (out / "runs" / "probe" / "seed1" / "metrics.json").read_text())["map"]
    assert all((out / "runs" / r / "metrics.json").stat().st_mtime_ns == t for r, t in stamp.items())
    assert not (tmp_path / "other" / "runs").exists()
    lr = tiny_params(None, **{**TINY, "detect__lr": 1e-3})
    run_ablation(lr, zoo, out, {"design": [Variant("probe")]}, seeds=[0])
    assert (out / "runs" / "probe" / "seed0" / "metrics.json").stat().st_mtime_ns != stamp["probe/seed0"]


def test_cli(zoo: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    out = tmp_path / "cli"
    argv = ["--manifests", str(zoo), "--out", str(out), "--train-tasks", "checker_a",
            "--groups", "design", "--methods", "probe", "--where", "mlp", "--params", str(PARAMS_YAML), *CLI_TINY]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "| linear probe |" in printed
    command = json.loads((out / "ablation.json").read_text())["command"]
    assert command.startswith("python -m benchmarks.detect_ablation --manifests") and "--methods probe" in command
    assert "--where-methods" not in command  # defaults are left out
    assert main([*argv, "--seeds", "a,b"]) == 2
    assert main([*argv, "--groups", "ranks", "--ranks", "8"]) == 2
    assert main([*argv, "--train-tasks", "nope"]) == 2
    # the old spelling `lorax detect-ablation ARGS` runs the benchmark as its own process (the CLI never imports it)
    assert lorax_main(["detect-ablation", *argv, "--seeds", "a,b"]) == 2
