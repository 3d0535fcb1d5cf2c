#!/usr/bin/env python
"""Check a COCO set against its images; optionally write a repaired copy.

    python tools/validate.py ANNOTATIONS.json [--images DIR] [--decode] [--fix OUT.json] [--xyxy]
                             [--json REPORT.json] [--all] [--overwrite]

Exit code 1 when the input has errors, 0 otherwise, 2 when the tool itself cannot run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from detector.cocotools.common import CocoError, check_output, default_image_dir, display_path
from detector.cocotools.validate import fix_coco, validate_coco
from detector.fileio import atomic_write_json


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("annotations", type=Path, help="COCO JSON file")
    p.add_argument(
        "--images",
        type=Path,
        help="image folder (default: images/ beside the JSON, else the JSON's folder)",
    )
    p.add_argument(
        "--decode",
        action="store_true",
        help="decode every image fully (slow; catches truncated files)",
    )
    p.add_argument(
        "--fix",
        type=Path,
        metavar="OUT.json",
        help="write a repaired copy here and list every change",
    )
    p.add_argument(
        "--xyxy",
        action="store_true",
        help="with --fix: read every bbox as [x1, y1, x2, y2] and convert it",
    )
    p.add_argument("--json", type=Path, metavar="REPORT.json", help="also write the report as JSON")
    p.add_argument("--overwrite", action="store_true", help="replace existing --fix/--json files")
    p.add_argument("--all", action="store_true", help="print every problem (default: 10 per kind)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        for out in (args.fix, args.json):
            if out is not None:
                check_output(out, args.annotations, overwrite=args.overwrite)
        if args.fix is not None and args.json is not None:
            check_output(args.fix, args.json, overwrite=True)  # only: not the same file
        if args.xyxy and args.fix is None:
            raise CocoError("--xyxy only applies with --fix OUT.json")
        report = validate_coco(
            args.annotations, args.images, args.decode, progress=not args.no_progress
        )
        print(report.format(limit=None if args.all else 10))
        result = {"report": report.to_dict()}
        if args.fix is not None:
            fixed = fix_coco(report, xyxy=args.xyxy)
            atomic_write_json(args.fix, fixed.data)
            print(
                f"\nrepaired copy {display_path(args.fix)}: {len(fixed.changes)} changes "
                f"({fixed.dropped_images} images and {fixed.dropped_annotations} boxes dropped)"
            )
            for change in fixed.changes:
                print(f"  - {change}")
            images_dir = report.images_dir
            recheck = validate_coco(args.fix, images_dir, args.decode, progress=False)
            print(f"repaired copy re-validated: {recheck.summary()}")
            if images_dir is not None and default_image_dir(args.fix) != images_dir:
                print(
                    f"note: its file_names are relative to {images_dir}; pass --images "
                    f"{images_dir} (or set data.*_images) when you use it"
                )
            result["fix"] = {
                "output": str(args.fix),
                "changes": fixed.changes,
                "recheck": recheck.to_dict(),
            }
        if args.json is not None:
            atomic_write_json(args.json, result)
            print(f"report written to {display_path(args.json)}")
    except (CocoError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
