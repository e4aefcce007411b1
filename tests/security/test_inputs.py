"""`lorax predict` / `lorax scan` inputs: a row for every skipped entry, FIFOs never opened, symlinks kept inside
the given folder; one-limit bomb messages; short settings errors that name the -S override."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from pipelines.cli import main
from lorax.data.images import BadImage, open_image
from lorax.serving.inputs import Refused, collect_inputs
from lorax.serving.scan import scan_inbox
from tests.helpers import PARAMS_YAML
from tests.helpers import tool_env
from tests.helpers import png_header_only

HANG_S = 300  # a hang fails the test after this long (a real run of the CLI takes a few seconds)


def _inbox(stream, tmp_path: Path) -> tuple[Path, Path]:
    """inbox/ with two images, a FIFO, a directory named x.png, a link inside, a link out, a hidden file; and the
    image the link out points to."""
    imgs = stream.val_images("deconv")[:2]
    inbox, outside = tmp_path / "inbox", tmp_path / "outside"
    inbox.mkdir()
    outside.mkdir()
    shutil.copy(imgs[0], inbox / "a.png")
    shutil.copy(imgs[1], outside / "secret.png")
    os.mkfifo(inbox / "pipe.png")
    (inbox / "x.png").mkdir()
    (inbox / "in.png").symlink_to(inbox / "a.png")
    (inbox / "out.png").symlink_to(outside / "secret.png")
    (inbox / ".hidden.png").write_bytes(b"x")
    (inbox / "notes.md").write_text("not an input")
    return inbox, outside / "secret.png"


def _rows(table: pd.DataFrame) -> dict[str, tuple[str, str]]:
    return {Path(p).name: (s, "" if pd.isna(e) else e) for p, s, e in zip(table["path"], table["status"],
                                                                       table["error"], strict=True)}


def test_every_skipped_entry_gets_a_row(stream, predictor, tmp_path: Path) -> None:
    inbox, _ = _inbox(stream, tmp_path)
    got = collect_inputs([inbox])
    assert [Path(str(p)).name for p in got] == ["a.png", "in.png", "out.png", "pipe.png", "x.png"]  # path order
    rows = _rows(predictor.predict(got, progress=False).table)
    assert rows["a.png"][0] == rows["in.png"][0] == "ok"  # a link that stays inside the folder is used
    assert rows["x.png"] == ("error", "a directory with an image ending (its images are listed separately)")
    assert rows["pipe.png"] == ("error", "not a regular file (FIFO); refused without opening it")
    assert rows["out.png"][0] == "error" and rows["out.png"][1].startswith(f"symlink leaving {inbox}")
    assert "pass --follow-links" in rows["out.png"][1]
    assert ".hidden.png" not in rows and "notes.md" not in rows  # hidden and non-image files: silent, as documented


def test_follow_links_uses_links_out_of_the_folder(stream, predictor, tmp_path: Path) -> None:
    inbox, secret = _inbox(stream, tmp_path)
    (inbox / "linked_dir").symlink_to(secret.parent, target_is_directory=True)
    refused = {Path(r.path).name: r.reason for r in collect_inputs([inbox]) if isinstance(r, Refused)}
    assert refused["linked_dir"].startswith("symlink leaving")  # a linked folder outside: a row, not walked
    got = collect_inputs([inbox], follow_links=True)
    names = [str(Path(str(p)).relative_to(inbox)) for p in got]
    assert "out.png" in names and "linked_dir/secret.png" in names and "linked_dir" not in names
    rows = _rows(predictor.predict(got, progress=False).table)
    assert rows["out.png"] == ("ok", "")


def test_a_link_named_on_the_command_line_is_followed(stream, tmp_path: Path, capsys) -> None:
    inbox, _ = _inbox(stream, tmp_path)
    out = tmp_path / "p.csv"
    assert main(["predict", str(inbox / "out.png"), "--model", str(stream.state), "--out", str(out)]) == 0
    assert list(pd.read_csv(out)["status"]) == ["ok"]
    # the same link found in a folder: refused, then used with --follow-links (the flag reaches collect_inputs)
    assert main(["predict", str(inbox), "--model", str(stream.state), "--out", str(out)]) == 0
    assert _rows(pd.read_csv(out))["out.png"][0] == "error"
    assert main(["predict", str(inbox), "--model", str(stream.state), "--out", str(out), "--follow-links"]) == 0
    assert _rows(pd.read_csv(out))["out.png"][0] == "ok"


def test_fifos_by_name_and_in_a_folder_do_not_hang(stream, tmp_path: Path) -> None:
    """A real `lorax predict` process under a hard timeout: a FIFO that were opened would block it forever."""
    inbox, _ = _inbox(stream, tmp_path)
    fifo = tmp_path / "named.png"
    os.mkfifo(fifo)
    out = tmp_path / "p.csv"
    res = subprocess.run([sys.executable, "-m", "pipelines.cli", "predict", str(fifo), str(inbox), "--model",
                          str(stream.state), "--out", str(out), "--no-openset"], capture_output=True, text=True,
                         cwd=tmp_path, env=tool_env(), timeout=HANG_S, check=False)
    assert res.returncode == 0, res.stderr
    t = pd.read_csv(out)
    assert list(t["path"])[:2] == [str(fifo), str(inbox / "a.png")]  # one row per input, in order
    rows = _rows(t)
    assert rows["named.png"] == rows["pipe.png"] == ("error", "not a regular file (FIFO); refused without opening it")
    assert "Traceback" not in res.stderr


def test_scan_follows_the_same_rules(stream, predictor, tmp_path: Path) -> None:
    inbox, _ = _inbox(stream, tmp_path)
    summary = scan_inbox(predictor, [inbox], tmp_path / "scan")
    rows = _rows(pd.read_csv(tmp_path / "scan" / "predictions.csv"))
    assert rows["pipe.png"][1].startswith("not a regular file (FIFO)") and rows["out.png"][1].startswith("symlink")
    assert rows["x.png"][0] == "error" and summary["n_errors"] == 3 and summary["n_ok"] == 2
    summary = scan_inbox(predictor, [inbox], tmp_path / "scan", overwrite=True, follow_links=True)
    assert _rows(pd.read_csv(tmp_path / "scan" / "predictions.csv"))["out.png"][0] == "ok" and summary["n_ok"] == 3


@pytest.mark.parametrize("w, h", [(10000, 9000), (20000, 20000), (2000, 1000)],
                         ids=["pillow-warning", "pillow-error", "our-check"])
def test_the_bomb_message_quotes_one_limit(tmp_path: Path, w: int, h: int) -> None:
    pillow = Image.MAX_IMAGE_PIXELS
    with pytest.raises(BadImage) as e:
        open_image(png_header_only(tmp_path / "bomb.png", w, h), max_pixels=1_000_000)
    msg = e.value.reason
    assert msg.startswith(f"decompression bomb: {f'{w}x{h} = ' if w < 5000 else ''}{w * h} pixels > "
                          f"data.max_image_pixels=1000000 (not decoded)"), msg
    assert str(pillow) not in msg and "limit of" not in msg and "raise data.max_image_pixels" in msg


def _cli_error(capsys, *sets: str) -> str:
    assert main(["train", "--params", str(PARAMS_YAML), "--out", "unused", *[a for s in sets for a in ("-S", s)]]) == 2
    return capsys.readouterr().err


def test_a_bad_s_value_names_the_s_override(capsys) -> None:
    err = _cli_error(capsys, "train.epochs=abc")
    assert err == ("lorax: error: invalid settings from -S train.epochs=abc: train.epochs: Input should be a valid "
                   "integer, unable to parse string as an integer (got 'abc')\n")
    assert _cli_error(capsys, "train.epochs.x=1") == ("lorax: error: invalid settings from -S train.epochs.x=1: "
                                                      "train.epochs.x: train.epochs is a value, not a section; set "
                                                      "it directly\n")


@pytest.mark.parametrize("value, says", [
    ("stream={a: {prev: init}}", "stream: ['a'] are not zoo generators"),
    ("stream={a: 1}", "stream.a: Input should be a valid dictionary or instance of StreamItem (got 1)"),
    ("model.img_size=4000", "model.img_size: Input should be less than or equal to 1024 (got 4000)"),
], ids=["cross-check", "item", "field"])
def test_settings_errors_are_one_short_line(capsys, value: str, says: str) -> None:
    err = _cli_error(capsys, value)
    assert err.count("\n") == 1 and len(err) < 400 and f"from -S {value.split('=')[0]}=" in err and says in err, err
    assert "'zoo': {" not in err  # never the whole config
