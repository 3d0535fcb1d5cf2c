#!/usr/bin/env python
"""Split a COCO set into train.json / val.json (/ test.json), stratified and group-aware.

    python tools/split.py ANNOTATIONS.json [--out DIR] [--images DIR] --val 0.2 [--test 0.1]
                          [--seed 0] [--no-hash] [--overwrite]
                          [--group-by name --pattern REGEX | field --field KEY | exif-time --gap 60s]

Copies of one photo (Roboflow `<name>_jpg.rf.<hash>.jpg`, byte-identical files) stay on one side;
with --group-by, so do the frames of one video or trail-camera sequence (near-identical frames on
both sides would inflate val mAP).
The files are written beside the input by default, so their file names keep pointing at the same
image folder.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from detector.cocotools.common import CocoError, display_path
from detector.cocotools.split import (
    GROUP_KINDS,
    GroupBy,
    images_note,
    parse_gap,
    split_file,
    split_table,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("annotations", type=Path, help="COCO JSON file to split")
    p.add_argument("--out", type=Path, help="output folder (default: the input's folder)")
    p.add_argument(
        "--images",
        type=Path,
        help="image folder, for content hashing (default: "
        "images/ beside the JSON, else its folder)",
    )
    p.add_argument("--val", type=float, default=0.2, help="share of images for val (default 0.2)")
    p.add_argument(
        "--test", type=float, default=0.0, help="share of images for test (default 0: no test.json)"
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument(
        "--no-hash",
        action="store_true",
        help="do not group byte-identical files (skips reading every image)",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace existing train/val/test.json files"
    )
    p.add_argument(
        "--group-by",
        choices=GROUP_KINDS,
        help="keep the frames of one video or camera burst on one side: 'name' (--pattern), "
        "'field' (--field), 'exif-time' (capture times within --gap, per camera and folder)",
    )
    p.add_argument(
        "--pattern",
        help=r"--group-by name: regex searched in file_name; group 1 (else the match) names "
        r"the sequence, e.g. '^(.+)_frame\d+\.jpg$' or '^(cam\d+/\d{8})'",
    )
    p.add_argument("--field", help="--group-by field: image record key, e.g. video_id")
    p.add_argument(
        "--gap", default="60s", help="--group-by exif-time: largest gap inside a sequence (60s)"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        group_by = None
        if args.group_by:
            group_by = GroupBy(args.group_by, args.pattern, args.field, parse_gap(args.gap))
        result = split_file(
            args.annotations,
            args.val,
            args.test,
            args.seed,
            args.out,
            args.images,
            hash_content=not args.no_hash,
            progress=not args.no_progress,
            overwrite=args.overwrite,
            group_by=group_by,
        )
    except (CocoError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(split_table(result))
    if result.dropped_annotations:
        print(
            f"warning: {result.dropped_annotations} annotations name an image id that is not "
            "listed; they are in no split (tools/validate.py reports them)"
        )
    if result.missing_images:
        print(
            f"warning: {result.missing_images} listed images are not in the image folder; they "
            "were split like the others (tools/validate.py --fix drops them first)"
        )
    if result.ungrouped_images:
        print(
            f"warning: --group-by {args.group_by} found no sequence for "
            f"{result.ungrouped_images} images; each of them is split on its own"
        )
    note = images_note(args.annotations, result, args.images)
    if note:
        print(note)
    written = ", ".join(
        f"{display_path(p)} ({len(result.splits[s]['images'])} images)"
        for s, p in result.paths.items()
    )
    print(
        f"split {result.num_groups} groups ({result.multi_image_groups} with several copies of "
        f"one photo) with seed {args.seed}: {written}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
