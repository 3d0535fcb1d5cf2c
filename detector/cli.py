"""Command line: ``detector train | evaluate | config | merge | export | predict | benchmark``."""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # evaluate imports torch; predict/benchmark must start without it
    from .evaluate import Evaluation

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
    p = sub.add_parser(
        "evaluate",
        help="COCO mAP and a deployment report of a checkpoint or its ONNX export",
        description="Score a .pt checkpoint or an exported .onnx file (run through the deploy "
        "runtime) on a COCO set; write metrics, per-class score thresholds, a confusion matrix, "
        "a gallery of mistakes and report.html in --out.",
    )
    p.add_argument("checkpoint", type=Path, help="best.pt / last.pt, or a .onnx from export")
    p.add_argument("--data", type=Path, help="COCO JSON (default for a .pt: the run's val set)")
    p.add_argument("--images", type=Path, help="image folder (default: images/ beside the JSON)")
    p.add_argument(
        "--out",
        type=Path,
        help="folder for the report, predictions.json, pr_curve.png, grid "
        "(default: eval-<json name> beside the model)",
    )
    p.add_argument("--device", default="auto", help=".pt: torch device")
    p.add_argument("--batch-size", type=int, default=4, help=".pt: images per forward pass")
    p.add_argument(
        "--providers",
        nargs="+",
        default=None,
        metavar="NAME",
        help=".onnx: execution providers in order (tensorrt cuda cpu; default: all three)",
    )
    p.add_argument(
        "--min-score",
        type=float,
        default=0.0,
        help=".onnx: score the runtime keeps for mAP (default 0: everything the graph outputs; "
        "its in-graph threshold, set at export, applies below it)",
    )
    p.add_argument(
        "--target-precision",
        type=float,
        default=0.9,
        help="per class, the lowest score threshold reaching this precision (thresholds.json)",
    )
    p.add_argument(
        "--score-threshold",
        type=float,
        default=None,
        help="one threshold for the confusion matrix and gallery (default: each class's "
        "target-precision threshold, else its max-F1 one)",
    )
    p.add_argument("--gallery", type=int, default=12, help="crops per gallery section")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_config(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "config",
        help="print the resolved config as YAML, each key with its comment",
        description="Print defaults <- CONFIG <- KEY=VALUE overrides as YAML, each key with its "
        "comment from detector/config.py; the output is itself a config file.",
    )
    p.add_argument("config", nargs="?", help="YAML config (default: the defaults only)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")


def frame_size(text: str) -> tuple[int, int]:
    """``WxH`` (e.g. ``1920x1080``) -> (width, height)."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected WIDTHxHEIGHT, e.g. 1920x1080; got {text!r}"
        ) from None
    if width < 1 or height < 1:
        raise argparse.ArgumentTypeError(f"width and height must be positive, got {text!r}")
    return width, height


def _add_export(sub: argparse._SubParsersAction) -> None:
    help_text = "export a checkpoint to ONNX, with a PyTorch/ONNX Runtime parity check"
    p = sub.add_parser("export", help=help_text, description=help_text)
    p.add_argument("checkpoint", type=Path, help="checkpoint written by training (runs/x/best.pt)")
    p.add_argument(
        "--out", type=Path, help="ONNX file to write (default: the checkpoint's name with .onnx)"
    )
    p.add_argument("--batch", type=int, default=1, help="fixed batch size N of the graph")
    p.add_argument(
        "--input-size",
        type=frame_size,
        metavar="WxH",
        help="static export for one camera resolution, e.g. 1920x1080: every shape is a constant "
        "and TensorRT builds one engine; other frame sizes are refused (default: any size)",
    )
    for name, what in (("min", "smallest"), ("opt", "typical"), ("max", "largest")):
        p.add_argument(
            f"--profile-{name}",
            type=frame_size,
            metavar="WxH",
            help=f"dynamic export: the TensorRT optimisation profile's {what} frame "
            "(default from the model's min_size/max_size)",
        )
    p.add_argument(
        "--float-input",
        action="store_true",
        help="graph input float32 [N,3,H,W] RGB 0..1 instead of uint8 [N,H,W,3] BGR frames",
    )
    p.add_argument("--raw-input", action="store_true", help=argparse.SUPPRESS)  # the default
    p.add_argument(
        "--fp16", action="store_true", help="half-precision backbone/RPN/box head (CUDA/TensorRT)"
    )
    p.add_argument(
        "--score-threshold",
        metavar="auto|FLOAT",
        help="per-class score thresholds stored for the runtime: auto (from detector evaluate's "
        "thresholds.json beside the checkpoint, or --thresholds) or one value for every class",
    )
    p.add_argument("--thresholds", type=Path, metavar="FILE", help="thresholds.json for auto")
    p.add_argument(
        "--no-simplify", action="store_true", help="keep the traced graph (no onnxsim pass)"
    )
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (>= 17)")
    p.add_argument(
        "--images", type=Path, help="folder of images for parity (default: the config's val set)"
    )
    p.add_argument("--parity-images", type=int, default=8, help="how many images parity uses")
    p.add_argument("--no-parity", action="store_true", help="skip the PyTorch/ONNX Runtime check")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (tracing and reference)")


def cmd_export(args: argparse.Namespace) -> int:
    from .export import ExportError, ParityError, export_onnx

    out = args.out if args.out is not None else Path(args.checkpoint).with_suffix(".onnx")
    profiles = (args.profile_min, args.profile_opt, args.profile_max)
    if any(profiles) and not all(profiles):
        raise ExportError("give all of --profile-min, --profile-opt and --profile-max, or none")
    try:
        report = export_onnx(
            args.checkpoint,
            out,
            batch=args.batch,
            fp16=args.fp16,
            raw_input=not args.float_input,
            opset=args.opset,
            parity_images=args.images,
            device=args.device,
            parity=not args.no_parity,
            parity_limit=args.parity_images,
            input_size=args.input_size,
            profiles=profiles if all(profiles) else None,
            simplify_graph=not args.no_simplify,
            score_threshold=args.score_threshold,
            thresholds=args.thresholds,
        )
    except ParityError as e:
        print(f"export: error: {e}", file=sys.stderr)
        return 1
    print(report.format())
    return 0


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
    from .run_folder import check_run_name
    from .train import summary, train

    cfg = load_config(args.config, args.overrides)
    check_run_name(cfg.train.name)
    resume = args.resume
    if resume == "auto":
        resume = newest_run(cfg.train.out_dir, cfg.train.name or "run")
    result = train(cfg, resume=resume, progress=not args.no_progress)
    if result.rank == 0:  # torchrun: one summary, rank 0's
        print(summary(result))
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from .config import format_config, load_config

    path, overrides = args.config, list(args.overrides)
    if path is not None and "=" in path and not Path(path).exists():
        path, overrides = None, [path, *overrides]  # `detector config key=value`: no file
    cfg = load_config(path, overrides)
    source = " <- ".join(["detector/config.py defaults", *([path] if path else []), *overrides])
    print(format_config(cfg, f"Resolved config: {source}"), end="")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .evaluate import format_metrics
    from .report import format_report, write_report

    if not 0 < args.target_precision <= 1:
        raise SystemExit(f"evaluate: --target-precision {args.target_precision} must be in (0, 1]")
    if args.checkpoint.suffix.lower() == ".onnx":
        evaluation = _evaluate_onnx(args)
    else:
        evaluation = _evaluate_checkpoint(args)
    out = _evaluate_out(args)
    report = write_report(
        evaluation,
        out,
        target_precision=args.target_precision,
        score_threshold=args.score_threshold,
        tensorboard_dir=out / "tensorboard",
        gallery_size=args.gallery,
    )
    print(format_metrics(evaluation.metrics))
    for note in evaluation.notes:
        print(note)
    print(format_report(evaluation, report))
    return 0


def _evaluate_out(args: argparse.Namespace) -> Path:
    if args.out is not None:
        return args.out
    if args.data is None:
        return args.checkpoint.parent / "eval-val"
    return args.checkpoint.parent / f"eval-{Path(args.data).stem}"


def _evaluate_onnx(args: argparse.Namespace) -> Evaluation:
    from .data import load_coco
    from .evaluate import onnx_class_names, run_onnx_evaluation

    if args.data is None:
        raise SystemExit("evaluate: an .onnx file needs --data SET.json")
    if not args.checkpoint.is_file():
        raise SystemExit(f"evaluate: {args.checkpoint}: no such file")
    cset = load_coco(args.data, args.images, class_names=onnx_class_names(args.checkpoint))
    return run_onnx_evaluation(
        args.checkpoint,
        cset,
        out_dir=_evaluate_out(args),
        min_score=args.min_score,
        providers=args.providers,
        progress=not args.no_progress,
    )


def _evaluate_checkpoint(args: argparse.Namespace) -> Evaluation:
    from .data import load_coco
    from .evaluate import run_evaluation
    from .model import load_model
    from .train import select_device

    model, checkpoint = load_model(args.checkpoint)
    data, images = args.data, args.images
    if data is None:
        data_cfg = checkpoint["config"]["data"]
        if not data_cfg.get("val_annotations"):
            raise SystemExit("evaluate: give --data (the checkpoint's run had no val set)")
        data, images = Path(data_cfg["val_annotations"]), images or data_cfg.get("val_images")
        args.data = data
    cset = load_coco(data, images, class_names=checkpoint["class_names"])
    device = select_device(args.device)
    model.to(device)
    return run_evaluation(
        model,
        cset,
        device,
        out_dir=_evaluate_out(args),
        batch_size=args.batch_size,
        model_name=args.checkpoint.name,
        progress=not args.no_progress,
    )


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
    _add_config(sub)
    _add_export(sub)
    _add_merge(sub)
    from . import benchmark, predict

    for name, module, help_text in (
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
        if args.command not in ("train", "config") or any(
            a.startswith("-") or "=" not in a for a in extra
        ):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    handlers = {
        "train": cmd_train,
        "evaluate": cmd_evaluate,
        "export": cmd_export,
        "merge": cmd_merge,
        "config": cmd_config,
    }
    handler = handlers.get(args.command) or args.handler
    try:
        return int(handler(args) or 0)
    except expected_errors(args.command) as e:
        # Expected failures: the message says what and where; no traceback to scare the user.
        print(f"error: {e}", file=sys.stderr)
        return 2


def expected_errors(command: str) -> tuple[type[BaseException], ...]:
    """Errors whose message is the whole story. predict/benchmark stay torch-free (vehicle)."""
    if command == "config":  # only reads YAML: no torch, no runtime
        from .config import ConfigError

        return (ConfigError, OSError)
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
    from .run_folder import TrainingError

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
