"""Command line: ``detector train | evaluate | merge | export | predict | benchmark``."""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

log = logging.getLogger("detector")

OVERRIDE = re.compile(r"[A-Za-z_]\w*(\.\w+)*=")  # train.max_hours=2; a path has a / or no =


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train (or resume) a detector from a YAML config",
        description="Train from CONFIG; KEY=VALUE arguments override it, e.g. "
        "train.epochs=20 model.arch=fasterrcnn_mobilenet_v3_large_fpn",
    )
    p.add_argument("config", type=Path, help="YAML config (see configs/ and detector/config.py)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    p.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        default=None,
        metavar="RUN",
        help="continue a stopped run: its folder or last.pt (default: the newest run "
        "of this config); a KEY=VALUE after it is an override, never the run",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars (log lines only)")


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="COCO mAP of a checkpoint on a COCO-format set")
    p.add_argument("checkpoint", type=Path, help="best.pt / last.pt written by detector train")
    p.add_argument("--data", type=Path, help="COCO JSON (default: the run's val set)")
    p.add_argument("--images", type=Path, help="image folder (default: images/ beside the JSON)")
    p.add_argument(
        "--out",
        type=Path,
        help="folder for predictions.json, pr_curve.png, grid "
        "(default: eval-<json name> beside the checkpoint)",
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=4)


def _add_merge(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "merge",
        help="one model from a base detector and a model trained from it on its frozen trunk",
        description="Append NEW's classes (its RPN + RoI heads) to BASE's, on their shared trunk; "
        "refused unless both trunks are bit-identical. Earlier classes keep their detections.",
    )
    p.add_argument("base", type=Path, help="the earlier detector's checkpoint")
    p.add_argument("new", type=Path, help="a checkpoint trained from BASE with its trunk frozen")
    p.add_argument("--out", type=Path, required=True, help="merged checkpoint to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")


def newest_run(out_dir: str, name: str) -> Path:
    base = Path(out_dir)
    candidates = [
        p
        for p in base.glob(f"{name}*")
        if p.is_dir()
        and (p / "last.pt").is_file()
        and (p.name == name or p.name[len(name) :].lstrip("-").isdigit())
    ]
    if not candidates:
        raise SystemExit(f"--resume: no run of '{name}' with a last.pt under {base}/")
    return max(candidates, key=lambda p: (p / "last.pt").stat().st_mtime)


def looks_like_override(text: str) -> bool:
    """``key.sub=value``: what follows ``--resume`` is then an override, not the run."""
    return OVERRIDE.match(text) is not None


def resume_takes_no_override(argv: list[str]) -> list[str]:
    """argparse gives ``--resume`` (nargs="?") the next word even when it is ``key=value``;
    spell that ``--resume`` as ``--resume=auto`` so the word stays an override."""
    return [
        "--resume=auto" if arg == "--resume" and looks_like_override(following) else arg
        for arg, following in zip(argv, [*argv[1:], ""], strict=True)
    ]


def cmd_train(args: argparse.Namespace) -> int:
    from .config import load_config
    from .train import check_run_name, summary, train

    cfg = load_config(args.config, args.overrides)
    check_run_name(cfg.train.name)
    resume = args.resume
    if resume == "auto":
        resume = newest_run(cfg.train.out_dir, cfg.train.name or "run")
    result = train(cfg, resume=resume, progress=not args.no_progress)
    if result.rank == 0:  # torchrun: one summary, rank 0's
        print(summary(result))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .data import load_coco
    from .evaluate import evaluate, format_metrics
    from .model import load_model
    from .train import select_device

    model, checkpoint = load_model(args.checkpoint)
    data = args.data
    images = args.images
    if data is None:
        data_cfg = checkpoint["config"]["data"]
        if not data_cfg.get("val_annotations"):
            raise SystemExit("evaluate: give --data (the checkpoint's run had no val set)")
        data, images = Path(data_cfg["val_annotations"]), images or data_cfg.get("val_images")
    cset = load_coco(data, images, class_names=checkpoint["class_names"])
    device = select_device(args.device)
    model.to(device)
    out = args.out or args.checkpoint.parent / f"eval-{Path(data).stem}"
    metrics = evaluate(model, cset, device, out_dir=out, batch_size=args.batch_size)
    print(format_metrics(metrics))
    print(f"wrote {out}/predictions.json, pr_curve.png, predictions_grid.png")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from .branches import describe
    from .model import load_model, merge_checkpoints, save_checkpoint

    if args.out.resolve() in (args.base.resolve(), args.new.resolve()):
        raise FileExistsError(f"merge: --out {args.out} is one of the inputs; name a new file")
    if args.out.exists() and not args.overwrite:
        raise FileExistsError(f"merge: {args.out} exists; pass --overwrite to replace it")
    save_checkpoint(args.out, merge_checkpoints(args.base, args.new))
    model, checkpoint = load_model(args.out)
    print(describe(model))
    print(f"wrote {args.out}: {len(checkpoint['class_names'])} classes")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="detector", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_evaluate(sub)
    _add_merge(sub)
    from . import benchmark, export, predict

    for name, module, help_text in (
        ("export", export, "export a checkpoint to ONNX, with a PyTorch/ONNX Runtime parity check"),
        ("predict", predict, "run an ONNX model on an image, a folder or a video"),
        ("benchmark", benchmark, "latency/FPS of an ONNX model per provider (and PyTorch eager)"),
    ):
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(handler=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = resume_takes_no_override(list(sys.argv[1:] if argv is None else argv))
    # KEY=VALUE overrides may come anywhere after `train CONFIG`, options included.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if args.command != "train" or any(a.startswith("-") or "=" not in a for a in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    handlers = {"train": cmd_train, "evaluate": cmd_evaluate, "merge": cmd_merge}
    handler = handlers.get(args.command) or args.handler
    try:
        return int(handler(args) or 0)
    except expected_errors(args.command) as e:
        # Expected failures: the message says what and where; no traceback to scare the user.
        print(f"error: {e}", file=sys.stderr)
        return 2


def expected_errors(command: str) -> tuple[type[BaseException], ...]:
    """Errors whose message is the whole story. predict/benchmark stay torch-free (vehicle)."""
    from .runtime import InputError, ModelError, ProviderError

    errors: tuple[type[BaseException], ...] = (InputError, ModelError, ProviderError, OSError)
    if command in ("predict", "benchmark"):
        return errors
    from .config import ConfigError
    from .data import DatasetError
    from .export import ExportError
    from .feature_cache import FeatureCacheError
    from .fileio import ImageReadError
    from .model import WeightsError
    from .train import TrainingError

    return (
        *errors,
        ConfigError,
        DatasetError,
        ExportError,
        FeatureCacheError,
        ImageReadError,
        WeightsError,
        TrainingError,
    )
