"""The served model reads no server file unless the operator allowed a folder, and every row of
a request gets its own answer (a bad row never fails the batch; no response carries a traceback).

The row parser is tested directly (fast); the trust boundary end to end against the real `mlflow models serve` of
the registered champion: one server with paths off (the default) and one with ``LORAX_SERVE_IMAGE_ROOT``, started
together once for the module.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from lorax.serving.predict import COLUMNS
from lorax.serving.rows import ENV_ROOT, PATHS_REFUSED, RootError, image_root, parse_value
from tests.helpers import MODEL, start_server, stop_server, wait_up


def _png(size: int = 20) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (10, 200, 30)).save(buf, "PNG")
    return buf.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, Path]:
    """An allowed root with an image, a symlink out, a FIFO and a folder; an image and a secret outside it."""
    root = tmp_path / "inbox"
    root.mkdir()
    (root / "inside.png").write_bytes(_png())
    (tmp_path / "outside.png").write_bytes(_png())
    (tmp_path / "secret.txt").write_text("secret")
    (root / "link.png").symlink_to(tmp_path / "outside.png")
    os.mkfifo(root / "fifo.png")
    (root / "dir.png").mkdir()
    return {"root": root, "outside": tmp_path / "outside.png", "secret": tmp_path / "secret.txt"}


# ------------------------------------------------------------------------------------------------ row parser


def test_bytes_and_base64_are_images_with_or_without_a_root(tree) -> None:
    png = _png()
    wrapped = base64.encodebytes(png).decode()  # `base64` CLI style: lines of 76 characters
    for root in (None, str(tree["root"].resolve())):
        for value in (png, bytearray(png), _b64(png), wrapped, "data:image/png;base64," + _b64(png)):
            row = parse_value(value, root)
            assert row.error is None and row.data == png, (root, repr(value)[:40])


def test_without_a_root_every_path_gets_the_same_refusal_and_nothing_is_probed(tree, monkeypatch) -> None:
    def probe(*args, **kwargs):
        raise AssertionError("the filesystem was probed for a request value")

    values = ["/etc/passwd", str(tree["outside"]), str(tree["root"] / "missing.png"), str(tree["root"] / "fifo.png"),
              "../../etc/shadow", "~/.ssh/id_rsa", "C:\\Windows\\win.ini", "image.png"]
    with monkeypatch.context() as m:
        for name in ("stat", "lstat", "open", "readlink"):
            m.setattr(os, name, probe)
        m.setattr(os.path, "realpath", probe)
        rows = [parse_value(v, None) for v in values]
    # the same answer whether the file exists, is missing or is a FIFO: no oracle of the server's files
    assert [r.error for r in rows] == [PATHS_REFUSED] * len(values)
    assert all(r.data is None and r.path is None for r in rows)
    assert ENV_ROOT in PATHS_REFUSED


def test_values_that_are_not_images_are_row_errors() -> None:
    cases = [
        ("neither a file nor base64!", "not valid base64"),
        ("", "empty string"),
        (7, "got int"),
        (2.5, "got float"),
        (None, "empty value (null)"),
        (float("nan"), "empty value (null)"),
        (["a"], "got list"),
        (b"", "empty bytes"),
    ]
    for value, message in cases:
        row = parse_value(value, None)
        assert row.data is None and message in (row.error or ""), (value, row.error)


def test_paths_under_the_root_are_read_and_nothing_else(tree) -> None:
    root = str(tree["root"].resolve())
    png = (tree["root"] / "inside.png").read_bytes()
    for value in (str(tree["root"] / "inside.png"), "inside.png", str(tree["root"] / "sub" / ".." / "inside.png")):
        row = parse_value(value, root)
        assert row.error is None and row.data == png and row.path == value
    outside = {
        str(tree["root"] / ".." / "outside.png"): "path outside the folder",
        "../outside.png": "path outside the folder",
        "link.png": "path outside the folder",  # a symlink inside the root that points out
        str(tree["secret"]): "path outside the folder",
        "/etc/passwd": "path outside the folder",
        "missing.png": "no such file",
        "dir.png": "not a regular file",
        "x\0y": "neither base64 image bytes nor a usable file path",
    }
    for value, message in outside.items():
        row = parse_value(value, root)
        assert row.data is None and message in (row.error or ""), (value, row.error)
        assert root not in row.error and str(tree["outside"]) not in row.error  # nothing the caller did not send


def test_a_fifo_under_the_root_is_refused_without_being_opened(tree) -> None:
    root = str(tree["root"].resolve())
    got: list = []
    t = threading.Thread(target=lambda: got.append(parse_value("fifo.png", root)), daemon=True)
    t.start()
    t.join(60)  # a hang guard (opening a FIFO with no writer blocks forever), not a timing check
    assert not t.is_alive(), "reading a FIFO blocked"
    assert "not a regular file" in got[0].error


def test_the_root_comes_from_the_operator_env_over_model(tree, tmp_path: Path, monkeypatch) -> None:
    root, other = str(tree["root"]), tmp_path / "other"
    other.mkdir()
    monkeypatch.delenv(ENV_ROOT, raising=False)
    assert image_root(None) is None
    assert image_root(root) == str(tree["root"].resolve())
    monkeypatch.setenv(ENV_ROOT, str(other))
    assert image_root(root) == str(other.resolve())  # the env var wins
    monkeypatch.setenv(ENV_ROOT, "")
    assert image_root(root) is None  # set but empty: paths off
    monkeypatch.setenv(ENV_ROOT, str(tmp_path / "no-such"))
    with pytest.raises(RootError, match=f"^{ENV_ROOT}=.*no-such: no such folder"):
        image_root(None)


def test_saved_root_env_override_and_mixed_batch_in_process(stream, tree, tmp_path: Path, monkeypatch) -> None:
    """save_attributor(image_root=...) lets the loaded model read paths there; the env var at load time overrides
    it; one row per input, in order, errors as rows; a request with no columns is one plain MlflowException."""
    import mlflow.pyfunc
    from mlflow.exceptions import MlflowException

    from pipelines.serving.pyfunc import save_attributor

    image = stream.val_images("deconv")[0]
    shutil.copy(image, tree["root"] / "val.png")
    save_attributor(tmp_path / "model", stream.state, image_root=tree["root"])
    monkeypatch.delenv(ENV_ROOT, raising=False)
    model = mlflow.pyfunc.load_model(str(tmp_path / "model"))
    batch = [str(tree["root"] / "val.png"), "val.png", _b64(image.read_bytes()), str(tree["outside"]), "bad base64!",
             _b64(b"not an image"), 7]
    out = model.predict(pd.DataFrame({"image": batch}))
    assert list(out["status"]) == ["ok", "ok", "ok", "error", "error", "error", "error"]
    # a value tried as a path is named by what the caller sent; the others by their row
    assert list(out["path"]) == [*batch[:2], "row 2", "row 3", *batch[4:6], "row 6"]
    assert out["fake_probability"][0] == pytest.approx(out["fake_probability"][2]) == pytest.approx(
        out["fake_probability"][1])
    assert "path outside the folder" in out["error"][3] and "got int" in out["error"][6]
    assert all("no such file under the server's image folder (nor base64 image bytes)" == e for e in out["error"][4:6])
    with pytest.raises(MlflowException, match="no columns") as e:
        model.predict(pd.DataFrame(index=range(2)))
    assert e.value.error_code == "INVALID_PARAMETER_VALUE" and "stack_trace" not in e.value.serialize_as_json()

    monkeypatch.setenv(ENV_ROOT, "")  # the operator turns paths off for this server, whatever the model says
    off = mlflow.pyfunc.load_model(str(tmp_path / "model")).predict(pd.DataFrame({"image": batch[:3]}))
    assert list(off["status"]) == ["error", "error", "ok"] and list(off["error"][:2]) == [PATHS_REFUSED] * 2


# ------------------------------------------------------------------------------------------------ real server


@pytest.fixture(scope="module")
def servers(stream, registry, tmp_path_factory):
    """(port without a root, port with one, files): both servers started together, once."""
    work = tmp_path_factory.mktemp("security-serve")
    root = work / "inbox"
    root.mkdir()
    image = stream.val_images("deconv")[0]
    shutil.copy(image, root / "inside.png")
    outside = stream.val_images("nnconv")[0]  # a real image elsewhere on the server
    (root / "link.png").symlink_to(outside)
    os.mkfifo(root / "fifo.png")
    plain = start_server(MODEL, registry, work, **{ENV_ROOT: None})
    rooted = start_server(MODEL, registry, work, **{ENV_ROOT: str(root)})
    try:
        for proc, port, log in (plain, rooted):
            wait_up(proc, port, log)
        yield plain[1], rooted[1], {"root": root, "image": image, "outside": outside}
    finally:
        stop_server(plain[0])
        stop_server(rooted[0])


def _call(port: int, body: bytes, content_type: str = "application/json") -> tuple[int, str]:
    req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                 headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def _rows(port: int, values: list, params: dict | None = None) -> tuple[list[dict], str]:
    payload: dict = {"dataframe_split": {"columns": ["image"], "data": [[v] for v in values]}}
    if params:
        payload["params"] = params
    code, text = _call(port, json.dumps(payload).encode())
    assert code == 200, text
    return json.loads(text)["predictions"], text


def _no_trace(text: str) -> None:
    assert "Traceback" not in text and "stack_trace" not in text and ".py\"" not in text, text[:2000]


@pytest.mark.slow
def test_server_refuses_paths_and_answers_every_row(servers) -> None:
    plain, _, f = servers
    good = _b64(f["image"].read_bytes())
    values = ["/etc/passwd", str(f["outside"]), str(f["root"] / "missing.png"), good, "bad base64!",
              _b64(b"GIF89a but not really"), 7, None]
    # a caller's params cannot allow paths: a param the model does not read is refused, in one line
    code, text = _call(plain, json.dumps({"dataframe_split": {"columns": ["image"], "data": [[v] for v in values]},
                                          "params": {"image_root": "/"}}).encode())
    assert code == 400 and "unknown request param(s) image_root" in json.loads(text)["message"]
    rows, text = _rows(plain, values)
    assert [r["status"] for r in rows] == ["error", "error", "error", "ok", "error", "error", "error", "error"]
    assert [r["path"] for r in rows] == [f"row {i}" for i in range(len(values))]
    assert [r["error"] for r in rows[:3]] == [PATHS_REFUSED] * 3  # existing, real image or missing: one answer
    assert "not valid base64" in rows[4]["error"] and "not an image" in rows[5]["error"]
    assert "got int" in rows[6]["error"] and "null" in rows[7]["error"]
    assert sum(e["probability"] for e in rows[3]["top"]) <= 1 + 1e-6 and len(rows[3]["top"]) == 3
    assert list(rows[0]) == COLUMNS and rows[0]["top"] == [None, None, None]
    _no_trace(text)
    assert str(f["outside"].parent) not in text and "root:" not in text


@pytest.mark.slow
def test_server_with_a_root_reads_only_regular_files_inside_it(servers) -> None:
    _, rooted, f = servers
    root = f["root"]
    values = [str(root / "inside.png"), "inside.png", _b64(f["image"].read_bytes()), str(root / ".." / "x.png"),
              f"{root}/../{f['outside'].name}", str(f["outside"]), "link.png", "fifo.png", "missing.png"]
    rows, text = _rows(rooted, values)
    assert [r["status"] for r in rows] == ["ok"] * 3 + ["error"] * 6
    assert rows[0]["fake_probability"] == pytest.approx(rows[2]["fake_probability"]) == pytest.approx(
        rows[1]["fake_probability"])
    assert all("path outside the folder" in r["error"] for r in rows[3:7])  # '..', absolute, symlink out
    assert "not a regular file" in rows[7]["error"] and "no such file" in rows[8]["error"]
    assert not any(str(root.resolve()) in r["error"] for r in rows[3:])
    _no_trace(text)


@pytest.mark.slow
def test_server_request_level_errors_are_one_line_without_a_trace(servers) -> None:
    plain, _, _ = servers
    code, text = _call(plain, json.dumps({"dataframe_records": [{}, {}]}).encode())  # rows without columns
    assert code == 400 and json.loads(text)["error_code"] == "INVALID_PARAMETER_VALUE" and "no columns" in text
    _no_trace(text)
    code, text = _call(plain, b"{not json")
    assert code == 400 and "valid JSON" in text
    _no_trace(text)
    code, text = _call(plain, b"image\n/etc/passwd\n", "text/plain")
    assert code == 415
    _no_trace(text)
    code, text = _call(plain, b"", "text/csv")  # MLflow's own parse error: it adds a trace unless told not to
    assert code == 400 and "CSV" in text
    _no_trace(text)
    code, text = _call(plain, b"image\n/etc/passwd\n", "text/csv")  # parsed: one error row, no trace
    assert code == 200 and json.loads(text)["predictions"][0]["error"] == PATHS_REFUSED
    _no_trace(text)
    code, text = _call(plain, json.dumps({"inputs": ["/etc/passwd", 3]}).encode())
    assert code == 200 and [r["status"] for r in json.loads(text)["predictions"]] == ["error", "error"]
    _no_trace(text)


@pytest.mark.slow
def test_server_refuses_columns_other_than_image_and_name(servers) -> None:
    """A misnamed column is not silently taken as the images: the whole request is refused, in one line."""
    plain, _, f = servers
    good = _b64(f["image"].read_bytes())
    for columns, data in ((["img"], [[good]]), (["foo", "bar"], [["x", "y"]])):
        code, text = _call(plain, json.dumps({"dataframe_split": {"columns": columns, "data": data}}).encode())
        message = json.loads(text)["message"]
        assert code == 400 and message == ("expected columns 'image' (base64 of the image bytes) and optional "
                                           f"'name'; got {columns}"), text[:500]
        _no_trace(text)
    code, text = _call(plain, json.dumps({"inputs": [good]}).encode())  # a plain list is still the image column
    assert code == 200 and [r["status"] for r in json.loads(text)["predictions"]] == ["ok"]


@pytest.mark.slow
def test_server_refusals_never_echo_the_request_and_params_are_the_models(servers) -> None:
    plain, _, _ = servers
    secret = "q" * 200_000  # a large malformed body: none of it comes back
    code, text = _call(plain, ("{\"dataframe_split\": " + secret).encode())
    assert code == 400 and "not valid JSON" in json.loads(text)["message"] and "qqqq" not in text and len(text) < 1000
    # a refusal of the model itself: MLflow would put the request's data in front of it
    code, text = _call(plain, json.dumps({"dataframe_split": {"columns": ["image"], "data": [[secret]]},
                                          "params": {"batch_size": 0}}).encode())
    message = json.loads(text)["message"]
    assert code == 400 and message.startswith("params.batch_size") and "\n" not in message and "qqqq" not in text
    # no rows is no predictions, whichever form says it
    for empty in ({"dataframe_split": {"columns": ["image"], "data": []}},
                  {"dataframe_split": {"columns": [], "data": []}}, {"dataframe_records": []}):
        code, text = _call(plain, json.dumps(empty).encode())
        assert (code, json.loads(text)) == (200, {"predictions": []}), (empty, text[:300])
    # request params: the model's (batch_size), or refused in one line
    body = {"dataframe_split": {"columns": ["image"], "data": [["bad base64!"]]}}
    code, text = _call(plain, json.dumps({**body, "params": {"batch_sise": 8}}).encode())
    message = json.loads(text)["message"]
    assert code == 400 and "unknown request param(s) batch_sise" in message and "\n" not in message
    code, text = _call(plain, json.dumps({**body, "params": {"batch_size": 0}}).encode())
    assert code == 400 and "params.batch_size: expected an integer from 1 to 4096" in json.loads(text)["message"]
    code, text = _call(plain, json.dumps({**body, "params": {"batch_size": 8}}).encode())
    assert code == 200 and json.loads(text)["predictions"][0]["status"] == "error"
    _no_trace(text)
