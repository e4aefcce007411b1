"""A manifest cannot smuggle data into training, exemplar selection, evaluation or calibration.

Real files on disk (a tiny zoo task, prepared), manifests edited as an attacker or a careless hand would: a path out
of the dataset root (``..``, absolute, a symlink out), a row pointed at another image of the dataset with its hashes
left, an image changed on disk after preparation, a ``pixel_sha256`` edited to pull another image's embedding.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from lorax.config import Params, params_to_dict
from lorax.data.images import DataError
from lorax.data.manifest import ManifestError, manifest_path, read_manifest, safe_paths, write_manifest
from lorax.data.prepare import prepare_tasks, quarantine_path
from lorax.data.zoo import synth_tasks
from tests.helpers import tiny_params

TASK = "deconv"
SMALL = {"zoo__train_per_class": 4, "zoo__val_per_class": 2, "stream": {TASK: {"prev": "init"}}}


@pytest.fixture
def zoo(tmp_path: Path) -> tuple[Params, pd.DataFrame]:
    """One prepared zoo task (8 train, 4 val images) of this test's own, and its manifest."""
    params = tiny_params(tmp_path, **SMALL)
    synth_tasks([TASK], params.data.root, params.zoo)
    prepare_tasks(params.data.root, [TASK], params.data.manifests, params.data, params.model.img_size)
    return params, read_manifest(manifest_path(params.data.manifests, TASK))


def _file(df: pd.DataFrame, i: int) -> Path:
    return Path(df.loc[i, "root"]) / df.loc[i, "path"]


def _first(df: pd.DataFrame, split: str) -> int:
    return int(df.index[df["split"] == split][0])


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _edit(df: pd.DataFrame, i: int, **cols: str) -> pd.DataFrame:
    df = df.copy()
    for k, v in cols.items():
        df.loc[i, k] = v
    return df


def _with(params: Params, **overrides) -> Params:
    return tiny_params(None, **{"data__root": params.data.root, "data__manifests": params.data.manifests,
                                **SMALL, **overrides})


def _run(stage: str, df: pd.DataFrame, params: Params, tmp_path: Path):
    """One consumer of a manifest: training, exemplar selection or evaluation (an untrained LoRAX for the last two:
    the checks come before any model output)."""
    from lorax.continual.methods import build_method
    from lorax.continual.trainer import train_task
    from tests.helpers import evaluate_task_list
    from lorax.continual.selection import select_exemplars

    if stage == "train":
        return train_task(None, df, None, params, tmp_path / "state")
    method = build_method(params)
    method.add_task(TASK)
    if stage == "select":
        return select_exemplars(method, df, None, params)
    return evaluate_task_list(method, [df], params)


def _outside_image(df: pd.DataFrame, tmp_path: Path) -> Path:
    """An image of the dataset's size outside its root (what a smuggled row would read); not one of its images, so
    only the path check can refuse it."""
    out = tmp_path / "outside.png"
    w, h = int(df["width"].iloc[0]), int(df["height"].iloc[0])
    Image.fromarray(np.random.default_rng(7).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(out)
    return out


def _leaving_row(kind: str, df: pd.DataFrame, i: int, tmp_path: Path) -> tuple[pd.DataFrame, str]:
    """The manifest with row ``i`` pointed out of the dataset root (hash set to the target's: only the path is
    wrong), and the row's path as the error must name it."""
    outside = _outside_image(df, tmp_path)
    root = Path(df.loc[i, "root"])
    if kind == "dotdot":
        rel = "../outside.png"  # root is tmp_path/zoo
        assert (root / rel).resolve() == outside.resolve()
    elif kind == "absolute":
        rel = str(outside)
    else:
        rel = str(Path(df.loc[i, "path"]).parent / "link.png")
        (root / rel).symlink_to(outside)
    return _edit(df, i, path=rel, sha256=_sha(outside)), rel


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
@pytest.mark.parametrize("stage", ["train", "evaluate"])
def test_row_leaving_the_dataset_root_is_refused(zoo, tmp_path: Path, kind: str, stage: str) -> None:
    params, df = zoo
    i = _first(df, "train" if stage == "train" else "val")
    bad, rel = _leaving_row(kind, df, i, tmp_path)
    with pytest.raises(ManifestError, match="point outside their dataset root") as e:
        _run(stage, bad, params, tmp_path)
    msg = str(e.value)
    assert rel in msg and f"task {TASK}" in msg and "lorax data prepare" in msg and "\n" not in msg
    assert ("data.follow_links" in msg) == (kind == "symlink")  # the setting is only offered where it helps
    assert not (tmp_path / "state").exists()


def test_follow_links_accepts_a_symlink_out_but_never_dotdot(zoo, tmp_path: Path) -> None:
    params, df = zoo
    i = _first(df, "train")
    linked, _ = _leaving_row("symlink", df, i, tmp_path)
    follow = _with(params, data__follow_links=True)
    assert safe_paths(linked, allow_links=True)[i].is_symlink()
    _run("train", linked, follow, tmp_path)
    assert (tmp_path / "state").is_dir()
    for kind in ("dotdot", "absolute"):
        bad, _ = _leaving_row(kind, df, i, tmp_path)
        with pytest.raises(ManifestError, match="point outside their dataset root"):
            safe_paths(bad, allow_links=True)


def test_prepare_quarantines_a_symlink_out_unless_follow_links(zoo, tmp_path: Path) -> None:
    params, df = zoo
    outside = _outside_image(df, tmp_path)
    link = Path(params.data.root) / TASK / "train" / "1_fake" / "zz_link.png"
    link.symlink_to(outside)
    inside = link.with_name("zz_inside.png")  # a symlink that stays in the root is an ordinary file
    inside.symlink_to(_file(df, _first(df, "train")))
    params = _with(params, data__bad_file_limit=0.5, data__check_leakage=False)  # a tiny task; the inside link
    prepare_tasks(params.data.root, [TASK], params.data.manifests, params.data, params.model.img_size)  # is a copy
    paths = set(read_manifest(manifest_path(params.data.manifests, TASK))["path"])
    quarantine = pd.read_csv(quarantine_path(params.data.manifests, TASK))
    assert f"{TASK}/train/1_fake/zz_inside.png" in paths and f"{TASK}/train/1_fake/zz_link.png" not in paths
    reason = quarantine.set_index("file").loc[str(link), "reason"]
    assert "symlink out of the dataset root" in reason and "data.follow_links" in reason

    follow = _with(params, data__follow_links=True, data__check_leakage=False)
    prepare_tasks(follow.data.root, [TASK], follow.data.manifests, follow.data, follow.model.img_size)
    assert f"{TASK}/train/1_fake/zz_link.png" in set(read_manifest(manifest_path(follow.data.manifests, TASK))["path"])


@pytest.mark.parametrize("decode_cache", [False, True], ids=["files", "decode-cache"])
def test_val_image_swapped_into_training_is_refused(zoo, tmp_path: Path, decode_cache: bool) -> None:
    """The row's path now names a val image; its hashes are still the train image's."""
    params, df = zoo
    params = _with(params, cache__decode=decode_cache, cache__dir=str(tmp_path / "cache"))
    i, v = _first(df, "train"), _first(df, "val")
    swapped = _edit(df, i, path=df.loc[v, "path"])
    with pytest.raises(ManifestError, match="changed since the manifest was written") as e:
        _run("train", swapped, params, tmp_path)
    msg = str(e.value)
    assert df.loc[v, "path"] in msg and f"task {TASK}, train" in msg and "lorax data prepare" in msg
    assert f"recorded {df.loc[i, 'sha256'][:12]}" in msg and "\n" not in msg
    assert not (tmp_path / "state").exists()


def _change_on_disk(path: Path) -> None:
    a = np.asarray(Image.open(path).convert("RGB")).copy()
    a[0, 0] ^= 255  # one pixel: same size and mode, other content
    Image.fromarray(a).save(path)


@pytest.mark.parametrize("stage", ["train", "select", "evaluate"])
@pytest.mark.parametrize("decode_cache", [False, True], ids=["files", "decode-cache"])
def test_image_changed_on_disk_after_preparation_is_refused(zoo, tmp_path: Path, stage: str,
                                                            decode_cache: bool) -> None:
    params, df = zoo
    params = _with(params, cache__decode=decode_cache, cache__dir=str(tmp_path / "cache"))
    i = _first(df, "val" if stage == "evaluate" else "train")
    _change_on_disk(_file(df, i))
    with pytest.raises(ManifestError, match="changed since the manifest was written") as e:
        _run(stage, df, params, tmp_path)
    assert df.loc[i, "path"] in str(e.value)


def test_rows_served_from_the_feature_store_are_still_checked(zoo, tmp_path: Path) -> None:
    """Every embedding of the val rows is stored after one evaluation; a file changed since must not reuse them."""
    from lorax.features.store import FeatureStore
    from lorax.continual.methods import build_method
    from tests.helpers import evaluate_task_list

    params, df = zoo
    method = build_method(params)
    method.add_task(TASK)
    first, _ = evaluate_task_list(method, [df], params, store=FeatureStore(tmp_path / "emb"))
    again, _ = evaluate_task_list(method, [df], params, store=FeatureStore(tmp_path / "emb"))  # all stored
    assert again == first
    i = _first(df, "val")
    _change_on_disk(_file(df, i))
    with pytest.raises(ManifestError, match="changed since the manifest was written") as e:
        evaluate_task_list(method, [df], params, store=FeatureStore(tmp_path / "emb"))
    assert df.loc[i, "path"] in str(e.value)


def test_edited_pixel_hash_cannot_pull_another_images_embedding(zoo, tmp_path: Path) -> None:
    from lorax.features.store import FeatureStore
    from lorax.continual.methods import build_method
    from lorax.continual.evaluation import predict_logits

    params, df = zoo
    method = build_method(params)
    method.add_task(TASK)
    val = df[df["split"] == "val"].reset_index(drop=True)
    ref, _ = predict_logits(method, val, params, store=FeatureStore(tmp_path / "emb"))
    assert not np.allclose(ref[0], ref[1])  # two images the model tells apart
    edited = _edit(val, 0, pixel_sha256=val.loc[1, "pixel_sha256"])  # "row 0 has row 1's pixels"
    got, _ = predict_logits(method, edited, params, store=FeatureStore(tmp_path / "emb"))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_change_found_in_a_dataloader_worker_is_one_line(zoo) -> None:
    """torch re-raises a worker's exception with the worker's traceback in its message; ours stays one line."""
    from lorax.data.dataset import HALF, make_loader

    params, df = zoo
    i = _first(df, "train")
    _change_on_disk(_file(df, i))
    loader = make_loader(df, False, params.model.img_size, HALF, HALF, batch_size=4, num_workers=1)
    with pytest.raises(ManifestError) as e:
        list(loader)
    msg = str(e.value)
    assert msg.startswith("1 image(s) changed") and "\n" not in msg and "Traceback" not in msg
    assert df.loc[i, "path"] in msg


def test_open_set_calibration_checks_every_image(predictor, tmp_path: Path) -> None:
    """The Predictor reads the files itself; the calibration hands it bytes it has checked."""
    from lorax.data.manifest import load_stream_manifests
    from lorax.serving.openset import calibrate

    params = tiny_params(tmp_path, **{k: v for k, v in SMALL.items() if k != "stream"})
    synth_tasks(params.tasks, params.data.root, params.zoo)
    prepare_tasks(params.data.root, params.tasks, params.data.manifests, params.data, params.model.img_size)
    manifests = load_stream_manifests(params.data.manifests, predictor.tasks)
    stats = calibrate(predictor, manifests)
    assert np.isfinite(stats.threshold)
    df = manifests[predictor.tasks[-1]]
    i = _first(df, "val")
    _change_on_disk(_file(df, i))
    with pytest.raises(ManifestError, match="changed since the manifest was written") as e:
        calibrate(predictor, manifests)
    assert df.loc[i, "path"] in str(e.value)
    bad, rel = _leaving_row("dotdot", df, i, tmp_path)
    with pytest.raises(ManifestError, match="point outside their dataset root"):
        calibrate(predictor, {**manifests, predictor.tasks[-1]: bad})


def test_lorax_train_prints_one_line_naming_the_row(zoo, tmp_path: Path, capsys) -> None:
    """What a user of `lorax train` sees for an edited manifest: exit 2 and one line, no traceback."""
    from pipelines.cli import main

    params, df = zoo
    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(params_to_dict(params), sort_keys=False))
    i = _first(df, "train")
    bad, rel = _leaving_row("dotdot", df, i, tmp_path)
    write_manifest(bad, manifest_path(params.data.manifests, TASK))
    capsys.readouterr()
    rc = main(["train", "--params", str(params_file), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and rel in err[0] and "lorax data prepare" in err[0], err


def test_untouched_manifest_passes_every_check(zoo) -> None:
    params, df = zoo
    from lorax.data.manifest import verify_files

    verify_files(df)  # every row inside its root, every file as prepared
    assert [str(p) for p in safe_paths(df)] == [str(_file(df, i)) for i in df.index]
    with pytest.raises(DataError, match="sha256"):
        verify_files(df.drop(columns="sha256"))


def test_a_validation_image_put_into_training_with_its_hashes_is_refused(zoo) -> None:
    """An edit that copies a val row's path AND hashes into a train row passes the file checks (the file is what the
    row says): the training set itself is checked against the validation splits."""
    from lorax.continual.methods import build_method
    from lorax.continual.trainer import training_rows

    params, df = zoo
    method = build_method(params)
    method.add_task(TASK)
    assert len(training_rows(method, df, None)) == int((df["split"] == "train").sum())  # untouched: fine
    val, train = _first(df, "val"), _first(df, "train")
    edited = df.copy()
    for col in ("path", "sha256", "pixel_sha256", "width", "height"):
        edited.loc[train, col] = df.loc[val, col]
    with pytest.raises(ManifestError, match=r"1 training row\(s\) hold validation images") as e:
        training_rows(method, edited, None)
    assert df.loc[val, "path"] in str(e.value) and "\n" not in str(e.value)
