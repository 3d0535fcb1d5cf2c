#!/usr/bin/env python
"""Statistics of a COCO set: boxes/images per class, box and image sizes, negatives.

    python tools/stats.py ANNOTATIONS.json [--images DIR] [--plot stats.png] [--json stats.json]
                          [--overwrite]

--images (default: images/ beside the JSON, else its folder) is only used to count the listed
images present on disk.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from detector.cocotools.common import (
    CocoError,
    check_output,
    display_path,
    image_dir_for,
    load_coco_json,
)
from detector.cocotools.stats import coco_stats, format_stats, plot_stats, stats_dict
from detector.fileio import atomic_write_json


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("annotations", type=Path, help="COCO JSON file")
    p.add_argument("--images", type=Path, help="image folder (to count the files present)")
    p.add_argument("--plot", type=Path, metavar="PNG", help="write a PNG with the plots")
    p.add_argument("--json", type=Path, metavar="JSON", help="write the numbers as JSON")
    p.add_argument("--overwrite", action="store_true", help="replace existing --plot/--json files")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        for out in (args.plot, args.json):
            if out is not None:
                check_output(out, args.annotations, overwrite=args.overwrite)
        data = load_coco_json(args.annotations)
        images_dir = image_dir_for(args.annotations, args.images)
        stats = coco_stats(data, images_dir if images_dir.is_dir() else None)
        print(format_stats(stats))
        if args.json is not None:
            atomic_write_json(args.json, stats_dict(stats))
            print(f"numbers written to {display_path(args.json)}")
        if args.plot is not None:
            plot_stats(stats, args.plot, title=display_path(args.annotations))
            print(f"plot written to {display_path(args.plot)}")
    except (CocoError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
