#!/usr/bin/env python3
"""Convert a label export (CVAT, VOC, YOLO, Label Studio, LabelMe, VIA, Create ML, AutoML, COCO)
to COCO: OUT/annotations.json + OUT/images/.

    python tools/convert.py [--from FORMAT] SRC --out DIR [--images DIR]
                            [--names a,b,c | --names-file F] [--link] [--overwrite] [--dry-run]
                            [--strict] [--merge-case] [--include-predictions]

All logic lives in detector.convert; this is only the command line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from detector.convert import FORMATS, ConversionError, convert, detect


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("src", type=Path, help="the export: a folder or one annotation file")
    p.add_argument("--out", type=Path, help="output folder (annotations.json + images/)")
    p.add_argument(
        "--from", dest="fmt", choices=sorted(FORMATS), help="source format (default: auto-detect)"
    )
    p.add_argument("--images", type=Path, help="image folder, when not where the export keeps it")
    names = p.add_mutually_exclusive_group()
    names.add_argument(
        "--names",
        help="comma-separated class names (YOLO class-id order; for "
        "other formats the category list and order)",
    )
    names.add_argument("--names-file", type=Path, help="class names, one per line")
    p.add_argument("--link", action="store_true", help="symlink images instead of copying")
    p.add_argument(
        "--overwrite", action="store_true", help="replace an earlier conversion in --out"
    )
    p.add_argument("--dry-run", action="store_true", help="check and report, write nothing")
    p.add_argument(
        "--strict",
        action="store_true",
        help="refuse the whole export for one unreadable or truncated image "
        "(default: skip and list it)",
    )
    p.add_argument(
        "--merge-case",
        action="store_true",
        help="merge class names that differ only in case (Deer/deer) into the first spelling",
    )
    p.add_argument(
        "--include-predictions",
        action="store_true",
        help="Label Studio: read a task's prediction as its labels when it has no annotation",
    )
    args = p.parse_args(argv)
    if args.out is None and not args.dry_run:
        p.error("--out is required (or --dry-run)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        names = None
        if args.names:
            names = [n.strip() for n in args.names.split(",") if n.strip()]
        elif args.names_file:
            try:
                text = args.names_file.read_text(encoding="utf-8-sig")
            except OSError as e:
                raise ConversionError(f"{args.names_file}: cannot read ({e.strerror})") from None
            names = [n.strip() for n in text.splitlines() if n.strip()]
        fmt = args.fmt
        if fmt is None:
            detection = detect(args.src)
            fmt = detection.format
            root = args.src if args.src.is_dir() else args.src.parent
            print(f"detected format: {detection.describe(root)}", flush=True)
        report = convert(
            args.src,
            args.out,
            fmt,
            images=args.images,
            names=names,
            link=args.link,
            overwrite=args.overwrite,
            dry_run=args.dry_run,
            progress=True,
            strict=args.strict,
            merge_case=args.merge_case,
            include_predictions=args.include_predictions,
        )
        report.detected = args.fmt is None
    except (ConversionError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
