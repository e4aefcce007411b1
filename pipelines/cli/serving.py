"""``lorax predict``, ``lorax scan``, ``lorax calibrate``, ``lorax card``: using a trained attributor."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from pipelines.cli.settings import add_settings_arguments

log = logging.getLogger(__name__)

MODEL_HELP = ("a state folder (OUT/state/<task>), a `lorax train` output folder (its last task), an MLflow model "
              "folder, or a registry URI such as models:/lorax-attributor@champion")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help=MODEL_HELP)
    add_settings_arguments(p, overrides=False)  # its tracking section names the registry
    p.add_argument("--batch-size", type=int, help="crops per forward pass (default: eval.batch_size of the model)")
    p.add_argument("--crops", type=int, help="crops averaged per image larger than the crop (default: eval.crops)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--manifests", help="manifests of the model's tasks, to calibrate the open-set score when the "
                                       "model has no calibration yet (default: the state's data.manifests)")


INPUT_RULES = (
    "Folders are walked recursively for image endings (.png, .jpg, ...); hidden files and folders are skipped, other "
    "files are passed over. An entry that looks like an input but is not used gets an error row saying why: a "
    "directory with an image ending, a FIFO/socket/device (never opened), a symlink whose target leaves the folder "
    "(unless --follow-links). A path named on the command line or in a list file is your explicit choice: a symlink "
    "there is followed (a FIFO or device is still refused without opening it)."
)


def _input_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--follow-links", action="store_true",
                   help="use symlinks inside a given folder that point outside it, and walk symlinked folders "
                        "(default: such links get an error row and are not opened)")


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="attribute images: real, or which known generator; unknown-generator score",
                       description=INPUT_RULES)
    p.add_argument("paths", nargs="+", help="image files, folders (recursive) or .txt files listing paths")
    p.add_argument("--out", required=True, help="predictions file: .csv, .json or .parquet")
    _input_args(p)
    _model_args(p)
    p.add_argument("--no-openset", action="store_true", help="skip the unknown-generator score")
    p.add_argument("--detector", help="also report a real/fake detector's verdict (detector_fake_probability, "
                                      "detector_verdict) and whether it agrees with the attributor's (agreement): "
                                      "reports/detect/detector.safetensors, a `lorax detect --out` folder or "
                                      "models:/lorax-detector@champion (default: the one the model carries, if any)")
    p.set_defaults(func=_predict)

    p = sub.add_parser("scan", help="flag images from unknown generators and group them into candidate tasks",
                       description=INPUT_RULES)
    p.add_argument("inbox", nargs="+", help="folders / files / list files of new images")
    p.add_argument("--out", required=True, help="folder for candidate_NN/train/1_fake/, scan.json, predictions.csv")
    _input_args(p)
    _model_args(p)
    p.add_argument("--min-group", type=int, default=3, help="smallest group written as a candidate task")
    p.add_argument("--max-groups", type=int, default=8, help="most groups the clustering may form")
    p.add_argument("--overwrite", action="store_true", help="replace a previous scan in --out")
    p.set_defaults(func=_scan)

    p = sub.add_parser("serve", help="serve the registry's champion over HTTP (MLflow's protocol), following the "
                                     "alias as it moves")
    add_settings_arguments(p, overrides=False)
    p.add_argument("--root", default=".", help="project root (the default sqlite store lives there)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback: whoever reaches the port "
                                                       "can score images)")
    p.add_argument("--port", type=int, default=5001)
    p.add_argument("--alias", default="champion", help="the alias to follow (default champion)")
    p.add_argument("--poll", type=float, default=5.0, help="seconds between checks of the alias (default 5)")
    p.set_defaults(func=_serve)

    p = sub.add_parser("calibrate", help="calibrate the open-set (unknown generator) score of a state once")
    p.add_argument("state", help="state folder (OUT/state/<task>)")
    p.add_argument("--manifests", help="manifests of the state's tasks (default: the state's data.manifests)")
    p.add_argument("--out", help="calibration folder (default: <state>.openset next to the state)")
    p.add_argument("--device", default="auto")
    p.add_argument("--require-fake", action="store_true",
                   help="flag only images that also look fake (fake probability >= 0.5)")
    p.set_defaults(func=_calibrate)

    p = sub.add_parser("card", help="write a model card (markdown + PNGs) for a state")
    p.add_argument("state", help="state folder (OUT/state/<task>)")
    p.add_argument("--metrics", help="metrics.json (stream summary) or an evaluation json; default: found next to "
                                     "the state (OUT/metrics.json, reports/metrics.json, eval/<task>.json)")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=_card)


def _predictor(args: argparse.Namespace):
    from pipelines.serving.download import load_predictor

    return load_predictor(args.model, args.params, device=args.device, crops=args.crops,
                          batch_size=args.batch_size, manifests=args.manifests,
                          openset=not getattr(args, "no_openset", False), detector=getattr(args, "detector", None))


def _fail(e: Exception) -> int:
    print(f"lorax: error: {e}", file=sys.stderr)
    return 2


def _predict(args: argparse.Namespace) -> int:
    from lorax.serving.errors import ServingError
    from lorax.serving.inputs import collect_inputs
    from lorax.serving.predict import check_output_path, write_table

    try:
        out = check_output_path(args.out)
        paths = collect_inputs(args.paths, follow_links=args.follow_links)
        predictor = _predictor(args)
    except ServingError as e:
        return _fail(e)
    table = predictor.predict(paths).table
    write_table(table, out)
    ok = table["status"] == "ok"
    n_fake = int((table["verdict"] == "fake").sum())
    n_unknown = int(table["unknown"].fillna(False).sum())
    print(f"{len(table)} images: {int(ok.sum()) - n_fake} real, {n_fake} fake ({n_unknown} flagged as unknown "
          f"generator), {int((~ok).sum())} unreadable -> {out}")
    sized = [len(g) for g in table["generators"] if isinstance(g, list)]
    if sized and predictor.sets is not None:
        print(f"prediction sets at {100 * predictor.sets.coverage:.0f}% coverage (column generators): mean "
              f"{sum(sized) / len(sized):.2f} labels, {sum(n == 1 for n in sized)} of {len(sized)} images a single one")
    if "agreement" in table.columns:
        n_dis = int((table["agreement"] == "disagree").sum())
        print(f"detector: {int((table['detector_verdict'] == 'fake').sum())} fake; disagrees with the attributor on "
              f"{n_dis} image(s) (column agreement; for generators the attributor never learned, trust the detector)")
    if not ok.any():
        reasons = table["error"].value_counts().head(3).to_dict()
        print(f"lorax: error: no image could be used ({reasons}); see {out}", file=sys.stderr)
        return 1
    return 0


def _scan(args: argparse.Namespace) -> int:
    from lorax.serving.errors import ServingError
    from lorax.serving.inputs import collect_inputs
    from lorax.serving.scan import scan_inbox

    if args.min_group < 1 or args.max_groups < 2:
        return _fail(ValueError("--min-group must be >= 1 and --max-groups >= 2"))
    try:
        collect_inputs(args.inbox, follow_links=args.follow_links)  # fail on an empty inbox before loading the model
        predictor = _predictor(args)
        summary = scan_inbox(predictor, args.inbox, args.out, min_group=args.min_group, max_groups=args.max_groups,
                             overwrite=args.overwrite, follow_links=args.follow_links)
    except ServingError as e:
        return _fail(e)
    print(f"{summary['n_images']} images, {summary['n_errors']} unreadable, {summary['n_flagged']} flagged as unknown "
          f"generator; {len(summary['candidates'])} candidate task(s): "
          f"{', '.join(c['name'] + ' (' + str(c['n_images']) + ')' for c in summary['candidates']) or 'none'} "
          f"-> {args.out}")
    if summary["n_ok"] == 0:
        print("lorax: error: no inbox image could be used; see predictions.csv", file=sys.stderr)
        return 1
    return 0


def _serve(args: argparse.Namespace) -> int:
    from lorax.config import load_params
    from pipelines.serving.server import registry_follower, serve
    from pipelines.tracking.tracker import Tracker
    from pipelines.tracking.uri import TrackingUnavailable

    params = load_params(Path(args.root) / args.params)
    try:
        tracker = Tracker(params, args.root)
    except TrackingUnavailable as e:
        print(f"lorax: error: {e}", file=sys.stderr)
        return 2
    name = params.tracking.registered_model
    follower = registry_follower(tracker, args.alias, args.poll)
    try:
        httpd = serve(follower, name, args.host, args.port)
    except OSError as e:
        print(f"lorax: error: cannot listen on {args.host}:{args.port}: {e.strerror or e}; choose another --port",
              file=sys.stderr)
        return 2
    cur = follower.current
    print(f"serving models:/{name}@{args.alias} (now version {cur.version if cur else 'none'}) on "
          f"http://{args.host}:{httpd.server_address[1]}/invocations; the alias is checked every {args.poll:g} s")
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        follower.stop()
        httpd.server_close()
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from lorax.serving.calibration import calibrate_state
    from lorax.serving.openset import OpenSetStats

    out = calibrate_state(args.state, args.manifests, args.out, device=args.device, require_fake=args.require_fake)
    stats = OpenSetStats.load(out)
    print(f"open-set threshold {stats.threshold:.4f} ({stats.meta['n_train']} train / {stats.meta['n_val']} val "
          f"images, dim {stats.meta['dim']}) -> {out}")
    return 0


def _find_metrics(state: Path) -> dict:
    """metrics.json (+ its details file) of the stream the state belongs to, when it covers exactly the state's
    tasks."""
    from lorax.continual.state import read_info
    from lorax.continual.summary import read_metrics

    tasks = read_info(state)["tasks"]
    root = state.resolve().parent.parent
    for f in (root / "metrics.json", root / "reports" / "metrics.json"):
        if f.is_file():
            m = read_metrics(f)
            if m.get("tasks") == tasks:
                return m
    return {}


def _card(args: argparse.Namespace) -> int:
    from pipelines.serving.card import write_model_card

    state = Path(args.state)
    if args.metrics:
        mp = Path(args.metrics)
        if not mp.is_file():
            raise FileNotFoundError(f"--metrics {mp}: not found")
        from lorax.continual.summary import read_metrics

        try:
            metrics = read_metrics(mp)  # a metrics.json with its details file, or an evaluation json
        except json.JSONDecodeError as e:
            raise ValueError(f"--metrics {mp}: not valid JSON ({e})") from None
    else:
        metrics = _find_metrics(state)
    path = write_model_card(state, metrics, args.out)
    print(f"model card: {path}")
    return 0
