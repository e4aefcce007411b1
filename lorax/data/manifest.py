"""Dataset manifests: one parquet table per task, one row per image.

Training never walks folders; it reads these tables. Columns (``MANIFEST_COLUMNS``):
``root`` (the dataset root), ``path`` (image path relative to root), ``task``, ``task_index``,
``split`` (train|val), ``label`` (0 real, 1 fake), ``class_id`` (2*task_index + label), ``subclass``
(CDDB sub-folder or UnivFD category, '' if none), ``sha256`` (of the file bytes), ``width``, ``height``,
``mode`` (original PIL mode).

Trust boundary: a manifest is a file anyone with write access can edit, so consumers never open ``root / path``
blindly. :func:`safe_paths` refuses rows whose path leaves their dataset root (``..``, absolute, or a symlink out of
the root unless ``data.follow_links``), and the loaders check each file's bytes against the recorded ``sha256``
(:func:`check_bytes`) with the hashing they already do, so an edited manifest cannot swap in other images.

Where the images are: a manifest on disk names no folder. Its ``root`` is ``.``, meaning ``data.root`` of the
settings that read it (:func:`rooted`), so a moved or copied project reads its own images. In memory, ``root`` is
that folder, absolute. A manifest also records where ``data.root`` was relative to its own folder, for readers
that have no settings (:func:`read_manifest` without ``data_root``). Older manifests hold an absolute ``root``:
they load, read under ``data.root``, with a one-line note.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import pandas as pd

from lorax.data.images import BadImage, DataError, read_bytes
from lorax.utils.io import atomic_path
from lorax.utils.progress import bar

MANIFEST_COLUMNS = [
    "root",
    "path",
    "task",
    "task_index",
    "split",
    "label",
    "class_id",
    "subclass",
    "sha256",
    "width",
    "height",
    "mode",
]

REAL, FAKE = 0, 1
HERE = "."  # the ``root`` a stored row has when it lies under data.root
ROOT_HINT = b"lorax.data_root"  # parquet metadata: data.root relative to the manifest's folder, for bare reads

log = logging.getLogger(__name__)
_NOTED: set[tuple[str, str]] = set()


def unrooted(df: pd.DataFrame, data_root: str | Path | None) -> pd.DataFrame:
    """``df`` as stored: rows under ``data_root`` get ``root`` ``.`` (their ``path`` is already relative to it);
    rows of another folder keep it, relative to ``data_root`` as :func:`rooted` reads it. In memory a relative root
    is relative to the working directory (``lorax data prepare --root data/x``), so it is compared and rewritten
    after resolving. No ``data_root``: unchanged."""
    if data_root is None or "root" not in df.columns or not len(df):
        return df
    base = os.path.abspath(data_root)

    def stored(r: str) -> str:
        if os.path.isabs(r) and os.path.abspath(r) != base:
            return r
        full = os.path.abspath(r)
        return HERE if full == base else os.path.relpath(full, base)

    return df.assign(root=[stored(r) for r in df["root"].astype(str)])


def rooted(df: pd.DataFrame, data_root: str | Path, source: object = "a manifest") -> pd.DataFrame:
    """``df`` as read: relative roots joined to ``data_root``. Absolute roots (manifests written before they held
    relative paths) are read under ``data_root`` too, with one note, so a copied project never reads the original."""
    if "root" not in df.columns or not len(df):
        return df
    base = os.path.abspath(data_root)
    roots = df["root"].astype(str)
    old = sorted({r for r in roots if os.path.isabs(r)})
    if old and (str(source), base) not in _NOTED:  # once per file and folder in a process
        _NOTED.add((str(source), base))
        log.warning("%s names the absolute dataset root %s (an older format); its images are read under data.root %s "
                    "(re-run prepare to rewrite it)", source, old[0] if len(old) == 1 else old, base)
    escaping = sorted({r for r in roots if not os.path.isabs(r) and ".." in r.replace(os.sep, "/").split("/")})
    if escaping:
        raise ManifestError(f"{source}: rows name the dataset root {escaping[0]!r}, outside data.root ('..'); "
                            f"{PREPARE_AGAIN}")
    return df.assign(root=[base if os.path.isabs(r) else os.path.normpath(os.path.join(base, r)) for r in roots])


def class_id(task_index: int, label: int) -> int:
    """Task i owns class 2i (its real images) and 2i+1 (its fakes)."""
    return 2 * task_index + label


def manifest_path(manifests_dir: str | Path, task: str) -> Path:
    return Path(manifests_dir) / f"{task}.parquet"


def abs_paths(df: pd.DataFrame) -> list[Path]:
    """Image paths of a manifest's rows, unchecked: for naming rows in reports; open files via :func:`safe_paths`."""
    return [Path(r) / p for r, p in zip(df["root"], df["path"], strict=True)]


_SHOW = 3  # rows named in an error message
PREPARE_AGAIN = "re-run `lorax data prepare` (or `dvc repro`) to rewrite the manifests; never edit them by hand"


class ManifestError(DataError):
    """Manifest rows that cannot be trusted (a path out of the dataset root, a file whose hash changed).

    Raised in DataLoader workers too, where torch re-raises it in the main process as
    ``type(message + worker traceback)``: the constructor keeps only the one line lorax wrote.
    """

    def __init__(self, message: str) -> None:
        if message.startswith("Caught ") and "\n" in message:  # torch's ExceptionWrapper.reraise
            message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
        super().__init__(message)


def row_name(root: str, path: str, task: object = None, split: object = None) -> str:
    """How an error names a row: the file, then the manifest (task) and split it is in."""
    where = ", ".join(str(v) for v in (f"task {task}" if task is not None else None, split) if v is not None)
    return f"{Path(str(root)) / str(path)}" + (f" ({where})" if where else "")


def _listing(items: list[str]) -> str:
    more = f"; and {len(items) - _SHOW} more" if len(items) > _SHOW else ""
    return "; ".join(items[:_SHOW]) + more


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def link_out_of(path: str | Path, real_root: str) -> str | None:
    """Where ``path`` really is when a symlink (of the file or a folder above it) takes it out of ``real_root``
    (an ``os.path.realpath``); None when it stays inside."""
    target = os.path.realpath(path)
    return None if _inside(target, real_root) else target


def _lexical_problem(rel: str) -> str | None:
    if not rel:
        return "empty path"
    if rel.startswith("/") or os.path.isabs(rel):
        return "absolute path"
    if ".." in rel.replace(os.sep, "/").split("/"):
        return "'..' in the path"
    return None


def safe_paths(df: pd.DataFrame, allow_links: bool = False) -> list[Path]:
    """``root / path`` of every row, after refusing rows that leave their dataset root (:class:`ManifestError`).

    Always refused: an absolute ``path`` or one with ``..``. Unless ``allow_links`` (``data.follow_links``): a path
    whose real location (symlinks resolved, in its folders or the file itself) is outside the real ``root``.
    Folders are resolved once each and files only checked with one ``lstat``, so this costs ~a stat per row.
    """
    tasks = df["task"].tolist() if "task" in df.columns else [None] * len(df)
    splits = df["split"].tolist() if "split" in df.columns else [None] * len(df)
    real_roots: dict[str, str] = {}
    dirs: dict[tuple[str, str], tuple[str, bool, str]] = {}
    out: list[Path] = []
    bad: list[str] = []
    links = False
    for root, rel, task, split in zip(df["root"].astype(str), df["path"].astype(str), tasks, splits, strict=True):
        full = os.path.join(root, rel)
        out.append(Path(full))
        why = _lexical_problem(rel)
        if why is None and not allow_links:
            parent = os.path.dirname(full)
            if (root, parent) not in dirs:  # (the folder's real path, whether it is inside the real root)
                real_root = real_roots.get(root) or real_roots.setdefault(root, os.path.realpath(root))
                real_dir = os.path.realpath(parent)
                dirs[root, parent] = (real_dir, _inside(real_dir, real_root), real_root)
            real_dir, dir_inside, real_root = dirs[root, parent]
            target = None
            if not dir_inside:
                target = os.path.join(real_dir, os.path.basename(full))
            elif os.path.islink(full) and not _inside(real := os.path.realpath(full), real_root):
                target = real
            if target is not None:
                why, links = f"resolves through a symlink to {target}, outside the dataset root {real_root}", True
        if why is not None:
            bad.append(f"{row_name(root, rel, task, split)}: {why}")
    if bad:
        links_fix = "; or, if those symlinks are meant, set data.follow_links: true" if links else ""
        raise ManifestError(
            f"{len(bad)} manifest row(s) point outside their dataset root: {_listing(bad)}. Fix: {PREPARE_AGAIN}"
            f"{links_fix}"
        )
    return out


def file_sha256(data: bytes) -> str:
    """What the manifest's ``sha256`` column records: the hash of the file's bytes."""
    return hashlib.sha256(data).hexdigest()


def changed_message(changed: list[str]) -> str:
    """One line naming the rows (``row_name: found X, recorded Y``) whose file no longer matches the manifest."""
    return (f"{len(changed)} image(s) changed since the manifest was written (their sha256 differs from the "
            f"manifest's): {_listing(changed)}. Fix: {PREPARE_AGAIN}")


def mismatch(name: str, found: str, expected: object) -> str:
    """One changed row, as :func:`changed_message` lists it."""
    return f"{name}: sha256 {found[:12]}, recorded {str(expected)[:12]}"


def check_bytes(data: bytes, expected: object, name: str) -> None:
    """Refuse (:class:`ManifestError`) file bytes whose sha256 is not the manifest's ``expected``."""
    found = file_sha256(data)
    if found != str(expected):
        raise ManifestError(changed_message([mismatch(name, found, expected)]))


def row_names(df: pd.DataFrame, paths: list[Path]) -> list[str]:
    """:func:`row_name` of every row (``paths``: the rows' files, from :func:`safe_paths`)."""
    tasks = df["task"].tolist() if "task" in df.columns else [None] * len(df)
    splits = df["split"].tolist() if "split" in df.columns else [None] * len(df)
    return [row_name(str(p.parent), p.name, t, s) for p, t, s in zip(paths, tasks, splits, strict=True)]


def verify_files(df: pd.DataFrame, allow_links: bool = False) -> None:
    """Check rows no loader will read (e.g. all their embeddings are stored): each path stays in its root and each
    file's sha256 is the recorded one. One read per file, no decoding; :class:`ManifestError` names every change."""
    if not len(df):
        return
    if "sha256" not in df.columns:
        raise DataError("manifest lacks the sha256 column; re-run `lorax data prepare`")
    paths = safe_paths(df, allow_links)
    changed = []
    rows = zip(paths, df["sha256"].astype(str), row_names(df, paths), strict=True)
    for path, expected, name in bar(rows, desc="checking stored rows' files", total=len(df), unit="file"):
        try:
            found = file_sha256(read_bytes(path))
        except BadImage as e:
            raise DataError(f"{e}; did the file change since preparation? {PREPARE_AGAIN}") from None
        if found != expected:
            changed.append(mismatch(name, found, expected))
    if changed:
        raise ManifestError(changed_message(changed))


def read_manifest(path: str | Path, data_root: str | Path | None = None) -> pd.DataFrame:
    """A manifest with absolute roots: under ``data_root`` (the settings' ``data.root``), or without it under the
    folder recorded beside the rows (where data.root was, relative to the manifest's folder, when it was written)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: manifest not found; run `lorax data prepare` (or `dvc repro`) first")
    df = pd.read_parquet(path)
    missing = [c for c in MANIFEST_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: not a lorax manifest, columns {missing} are missing; re-run `lorax data prepare`")
    if data_root is None:
        import pyarrow.parquet as pq

        hint = (pq.read_schema(path).metadata or {}).get(ROOT_HINT)
        if hint is None:  # an older manifest: its absolute roots are used as they are
            return df
        data_root = path.parent / hint.decode()
    return rooted(df, data_root, path)


def write_manifest(df: pd.DataFrame, path: str | Path, data_root: str | Path | None = None) -> Path:
    """Write ``df`` atomically; rows under ``data_root`` are stored relative to it (:func:`unrooted`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    missing = [c for c in MANIFEST_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"manifest for {path} lacks columns {missing}")
    df = unrooted(df[MANIFEST_COLUMNS + [c for c in df.columns if c not in MANIFEST_COLUMNS]], data_root)
    table = pa.Table.from_pandas(df, preserve_index=False)
    if data_root is not None:
        hint = os.path.relpath(os.path.abspath(data_root), os.path.abspath(path.parent))
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), ROOT_HINT: hint.encode()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


def load_stream_manifests(manifests_dir: str | Path, tasks: list[str],
                          data_root: str | Path | None = None) -> dict[str, pd.DataFrame]:
    """Manifests of the given tasks (:func:`read_manifest`), checked to carry the stream's task indices."""
    out = {}
    for i, t in enumerate(tasks):
        df = read_manifest(manifest_path(manifests_dir, t), data_root)
        if len(df) and int(df["task_index"].iloc[0]) != i:
            df = df.copy()
            df["task_index"] = i
            df["class_id"] = [class_id(i, int(lab)) for lab in df["label"]]
        out[t] = df
    return out


def check_no_val_in_training(train: pd.DataFrame, manifests: list[pd.DataFrame]) -> None:
    """Refuse (:class:`ManifestError`) training rows (a task's train split plus replayed exemplars) that hold an image
    of a validation split: preparation refuses such leaks, so only an edited manifest or memory file gets here.

    Compared on the recorded hashes (file and decoded pixels); the loaders check those hashes against the files.
    """
    val_keys: dict[str, str] = {}
    for m in manifests:
        val = m[m["split"] == "val"]
        for col in ("sha256", "pixel_sha256"):
            if col in val.columns:
                val_keys.update({str(h): row_name(r, p, t, "val") for h, r, p, t in
                                 zip(val[col], val["root"], val["path"], val["task"], strict=True)})
    if not val_keys:
        return
    cols = [c for c in ("sha256", "pixel_sha256") if c in train.columns]
    hit = pd.Series(False, index=train.index)
    for col in cols:
        hit |= train[col].astype(str).isin(val_keys)
    leaks = []
    for _, row in train[hit].iterrows():
        where = next(val_keys[str(row[c])] for c in cols if str(row[c]) in val_keys)
        leaks.append(f"{row_name(row['root'], row['path'], row.get('task'), row.get('split'))} is {where}")
    if leaks:
        raise ManifestError(f"{len(leaks)} training row(s) hold validation images: {_listing(leaks)}. "
                            f"Fix: {PREPARE_AGAIN} (and the exemplar memory: re-run selection)")
