"""Views: what names a stored tensor's input. Every part of a view changes its id; training views come from each
image's content (the same wherever the image sits); evaluation views are the eval.crops grid."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from lorax.continual.batches import dataset_for
from lorax.continual.methods import build_method
from lorax.data.dataset import crop_boxes, resampled_size
from lorax.features.views import (
    Views,
    content_seeds,
    eval_views,
    image_digests,
    train_views,
    view_batches,
    view_id,
)
from tests.helpers import tiny_params

DIGEST = "ab" * 32


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    """The tiny two-task zoo, prepared (24 x 24 images, 12 train images per class and task), and a LoRAX method."""
    from lorax.data.manifest import load_stream_manifests
    from lorax.data.prepare import prepare_tasks
    from lorax.data.zoo import synth_tasks

    root = tmp_path_factory.mktemp("views")
    params = tiny_params(root, cache__dir=str(root / "cache"))
    synth_tasks(params.tasks, params.data.root, params.zoo)
    prepare_tasks(params.data.root, params.tasks, params.data.manifests, params.data, params.model.img_size)
    method = build_method(params, ["a"])
    return params, load_stream_manifests(params.data.manifests, params.tasks), method


def _rows(manifests, task="deconv", split="train") -> pd.DataFrame:
    df = manifests[task]
    return df[df["split"] == split].reset_index(drop=True)


def test_every_part_of_a_view_changes_its_id() -> None:
    base = {"box": [1, 2, 17, 18], "flip": False}
    ids = {view_id(DIGEST, base)}
    ids.add(view_id("ac" * 32, base))  # another image
    ids.add(view_id(DIGEST, {**base, "box": [1, 3, 17, 19]}))  # another box
    ids.add(view_id(DIGEST, {**base, "box": [1, 2, 18, 19]}))  # another crop size
    ids.add(view_id(DIGEST, {**base, "flip": True}))  # flipped
    ids.add(view_id(DIGEST, {**base, "control": [0.5, "lanczos"]}))  # resized before cropping
    ids.add(view_id(DIGEST, {**base, "control": [0.5, "bilinear"]}))  # ... with another filter
    ids.add(view_id(DIGEST, {**base, "control": [1.0, "jpeg90"]}))  # re-encoded
    ids.add(view_id(DIGEST, {**base, "control": [1.0, "jpeg75"]}))
    assert len(ids) == 9 and all(len(i) == 32 for i in ids)
    assert view_id(DIGEST, base) == view_id(DIGEST, {"flip": False, "box": [1, 2, 17, 18]})  # key order: no matter


def test_digests_must_be_the_manifests_sha256() -> None:
    with pytest.raises(ValueError, match="lacks the sha256 column"):
        image_digests(pd.DataFrame({"path": ["x.png"]}))
    for bad in ("ab" * 31, "zz" * 32, "ab" * 33):
        with pytest.raises(ValueError, match="not 64 hex digits") as e:
            image_digests(pd.DataFrame({"sha256": [DIGEST, bad]}))
        assert "\n" not in str(e.value)
    assert image_digests(pd.DataFrame({"sha256": [DIGEST.upper()]})) == [DIGEST.upper()]


def test_content_seeds_follow_the_image_not_its_row() -> None:
    digests = [f"{i:064x}" for i in range(6)]
    seeds = content_seeds(digests, 3)
    assert seeds.shape == (6, 3) and seeds.dtype == np.int64 and (seeds >= 0).all()
    assert len(set(seeds.reshape(-1).tolist())) == seeds.size  # distinct per image and view index
    assert np.array_equal(content_seeds(digests[::-1], 3), seeds[::-1])  # other order
    assert np.array_equal(content_seeds(digests[2:4], 3), seeds[2:4])  # other rows around it
    assert np.array_equal(content_seeds(digests, 2), seeds[:, :2])  # view j does not depend on K
    assert content_seeds([], 2).shape == (0, 2)


def test_train_views_are_deterministic_per_image_content(zoo) -> None:
    params, manifests, method = zoo
    rows = _rows(manifests)
    views = train_views(rows, dataset_for(rows, method, params, True, 0), 3)
    assert views.k == 3 and views.rows == len(rows) and views.ids.shape == (3 * len(rows), 32)
    by_digest = {d: views.ids[3 * r:3 * r + 3] for r, d in enumerate(rows["sha256"])}
    # the same image gets the same views wherever it sits: another order, among other rows (another task's, as
    # replayed exemplars are), with another dataset seed
    shuffled = rows.sample(frac=1.0, random_state=0).reset_index(drop=True)
    mixed = pd.concat([_rows(manifests, "nnconv"), shuffled.iloc[:7]], ignore_index=True)
    for df, seed in ((shuffled, 0), (mixed, 5)):
        again = train_views(df, dataset_for(df, method, params, True, seed), 3)
        for r, d in enumerate(df["sha256"]):
            if d in by_digest:
                assert np.array_equal(again.ids[3 * r:3 * r + 3], by_digest[d])
    # view j of an image does not depend on K
    two = train_views(rows, dataset_for(rows, method, params, True, 0), 2)
    assert np.array_equal(two.ids.reshape(-1, 2, 32), views.ids.reshape(-1, 3, 32)[:, :2])
    assert len({i.tobytes() for i in views.ids}) > 2 * len(rows)  # an image's views mostly differ


def test_train_view_ids_name_the_pixels_the_dataset_cuts(zoo) -> None:
    """The ids come from the manifest's width and height, without decoding: equal ids, equal pixels, and the crop
    the dataset cuts for a view's seed is the one its id names."""
    params, manifests, method = zoo
    rows = _rows(manifests).iloc[:8].reset_index(drop=True)
    ds = dataset_for(rows, method, params, True, 0)
    views = train_views(rows, ds, 3)
    crops = [ds[(r, int(views.seeds[r, j]))][0] for r in range(len(rows)) for j in range(3)]
    for r in range(len(rows)):
        for a in range(3):
            for b in range(a + 1, 3):
                s, t = 3 * r + a, 3 * r + b
                assert np.array_equal(views.ids[s], views.ids[t]) == torch.equal(crops[s], crops[t])
    # and the id is that of the box and flip the dataset's draw for the seed gives
    w, h = int(rows.loc[0, "width"]), int(rows.loc[0, "height"])
    boxes, flip = ds._boxes(w, h, np.random.default_rng(int(views.seeds[0, 1])), ds.paths[0])
    assert bytes(views.ids[1]) == view_id(rows.loc[0, "sha256"], {"box": list(boxes[0]), "flip": flip})
    left, top, right, bottom = boxes[0]
    from PIL import Image

    from lorax.data.dataset import to_tensor
    from lorax.data.manifest import abs_paths

    pixels = np.asarray(Image.open(abs_paths(rows.iloc[:1])[0]).convert("RGB"))[top:bottom, left:right]
    want = to_tensor(pixels[:, ::-1] if flip else pixels, ds.mean, ds.std)
    assert torch.equal(crops[1], want)


@pytest.mark.parametrize("n_crops", [1, 4])
def test_eval_views_are_the_crop_grid(zoo, n_crops) -> None:
    params, manifests, _ = zoo
    val = _rows(manifests, split="val")
    crop = params.model.img_size
    views = eval_views(val, crop, n_crops)
    assert views.k == n_crops and views.seeds is None and views.rows == len(val)
    want = [view_id(d, {"box": list(b), "flip": False}) for d, w, h in zip(val["sha256"], val["width"],
                                                                             val["height"], strict=True)
            for b in crop_boxes(int(w), int(h), crop, n_crops)]
    assert [bytes(i) for i in views.ids] == want
    # a shortcut control is another view of the same boxes: the resized image's grid, or the re-encoded one's
    resized = eval_views(val, crop, n_crops, (0.75, "lanczos"))
    w, h = resampled_size(int(val.loc[0, "width"]), int(val.loc[0, "height"]), 0.75)
    assert bytes(resized.ids[0]) == view_id(val.loc[0, "sha256"], {"box": list(crop_boxes(w, h, crop, n_crops)[0]),
                                                                    "flip": False, "control": [0.75, "lanczos"]})
    jpeg = eval_views(val, crop, n_crops, (1.0, "jpeg90"))
    assert bytes(jpeg.ids[0]) == view_id(val.loc[0, "sha256"], {"box": list(crop_boxes(
        int(val.loc[0, "width"]), int(val.loc[0, "height"]), crop, n_crops)[0]), "flip": False,
        "control": [1.0, "jpeg90"]})
    assert len({i.tobytes() for i in np.concatenate([views.ids, resized.ids, jpeg.ids])}) == 3 * len(views.ids)


def test_view_batches_yield_the_asked_views_only(zoo) -> None:
    """Eval rows are decoded once for all their crops; training slots one by one; only asked positions come back,
    each with the value of its own crop."""
    params, manifests, method = zoo
    val = _rows(manifests, split="val").iloc[:5].reset_index(drop=True)
    cpu = torch.device("cpu")

    def fn(x):  # one value per crop: its pixel sum and mean
        return torch.stack([x.sum((1, 2, 3)), x.mean((1, 2, 3))], 1)

    ds = dataset_for(val, method, params, False, 0, 4)
    views = eval_views(val, params.model.img_size, 4)
    asked = np.array([1, 2, 7, 19])
    got = {}
    for slots, values in view_batches(fn, ds, views, asked, batch_size=8, device=cpu):
        got.update(zip(slots.tolist(), values, strict=True))
    assert sorted(got) == asked.tolist()
    for s, v in got.items():
        torch.testing.assert_close(v, fn(ds[s // 4][0][s % 4].unsqueeze(0))[0])
    train = _rows(manifests).iloc[:6].reset_index(drop=True)
    tds = dataset_for(train, method, params, True, 0)
    tviews = train_views(train, tds, 2)
    got = {}
    for slots, values in view_batches(fn, tds, tviews, np.array([0, 3, 11]), batch_size=2, device=cpu):
        got.update(zip(slots.tolist(), values, strict=True))
    assert sorted(got) == [0, 3, 11]
    for s, v in got.items():
        r, j = divmod(s, 2)
        torch.testing.assert_close(v, fn(tds[(r, int(tviews.seeds[r, j]))][0].unsqueeze(0))[0])
    assert list(view_batches(fn, tds, tviews, np.array([], dtype=np.int64), 2, cpu)) == []
    assert isinstance(tviews, Views)
