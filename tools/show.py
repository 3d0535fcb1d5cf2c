#!/usr/bin/env python
"""Draw the boxes and class names of some images of a COCO set to PNG files.

    python tools/show.py ANNOTATIONS.json --out DIR [-n 16] [--ids ID ...] [--seed 0]
                         [--images DIR] [--max-size 1280] [--overwrite]

Images are read as the trainer reads them (EXIF rotation applied). Missing images are skipped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from detector.cocotools.common import CocoError, display_path
from detector.cocotools.show import show_coco


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("annotations", type=Path, help="COCO JSON file")
    p.add_argument("--out", type=Path, required=True, help="folder for the PNG files")
    p.add_argument("-n", type=int, default=16, help="number of random images (default 16)")
    p.add_argument("--ids", nargs="+", help="draw these image ids instead of random ones")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--images",
        type=Path,
        help="image folder (default: images/ beside the JSON, else the JSON's folder)",
    )
    p.add_argument(
        "--max-size",
        type=int,
        default=1280,
        help="downscale larger images to this side (0: never; default 1280)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace PNGs drawn before")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.n < 1 and not args.ids:
        print("error: -n must be at least 1", file=sys.stderr)
        return 2
    try:
        result = show_coco(
            args.annotations,
            args.out,
            args.n,
            args.ids,
            args.seed,
            args.images,
            args.max_size,
            progress=not args.no_progress,
            overwrite=args.overwrite,
        )
    except (CocoError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for why in result.skipped[:20]:
        print(f"skipped {why}")
    if len(result.skipped) > 20:
        print(f"... and {len(result.skipped) - 20} more skipped")
    print(
        f"wrote {len(result.written)} PNGs to {display_path(args.out)}"
        + (
            f" ({len(result.skipped)} images skipped: missing or unreadable)"
            if result.skipped
            else ""
        )
    )
    return 0 if result.written else 1


if __name__ == "__main__":
    sys.exit(main())
