#!/usr/bin/env python
"""Merge COCO sets into one self-contained set (categories matched by name, ids renumbered).

    python tools/merge.py A.json B.json ... --out merged.json [--images-out DIR] [--copy]
                          [--images DIR_A DIR_B ...] [--names NAME_A NAME_B ...] [--drop-empty]

Each source's images go to <images-out>/<source name>/ as hard links (copies with --copy, or
where a hard link is impossible);
--images-out defaults to images/ beside the merged JSON, where the trainer looks by default.
--images gives one image folder per source, '-' for the default (images/ beside its JSON, else
its folder).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from detector.cocotools.common import CocoError, display_path
from detector.cocotools.merge import MergeSource, images_note, merge_coco, write_merged


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "sources", type=Path, nargs="+", metavar="ANNOTATIONS.json", help="COCO files to merge"
    )
    p.add_argument("--out", type=Path, required=True, help="merged COCO JSON to write")
    p.add_argument(
        "--images-out",
        type=Path,
        help="image folder of the merged set (default: images/ beside --out)",
    )
    p.add_argument("--copy", action="store_true", help="copy images instead of hard-linking them")
    p.add_argument(
        "--images",
        nargs="+",
        metavar="DIR",
        help="image folder of each source, in order ('-': the default)",
    )
    p.add_argument(
        "--names",
        nargs="+",
        metavar="NAME",
        help="folder name of each source in the merged image folder",
    )
    p.add_argument(
        "--drop-empty", action="store_true", help="drop categories with no boxes in any source"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        n = len(args.sources)
        for option in ("images", "names"):
            given = getattr(args, option)
            if given is not None and len(given) != n:
                raise CocoError(f"--{option}: give one per source ({n}), '-' for the default")
        image_dirs = [None if d in (None, "-") else Path(d) for d in (args.images or [None] * n)]
        names = [None if s in (None, "-") else s for s in (args.names or [None] * n)]
        sources = [
            MergeSource(a, d, s) for a, d, s in zip(args.sources, image_dirs, names, strict=True)
        ]
        result = merge_coco(sources, drop_empty=args.drop_empty, progress=not args.no_progress)
        written = write_merged(
            result,
            args.out,
            args.images_out,
            args.copy,
            sources,
            progress=not args.no_progress,
            overwrite=args.overwrite,
        )
    except (CocoError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for name, src in zip(result.names, sources, strict=True):
        cmap = result.category_maps[name]
        remapped = sum(1 for old, new in cmap.items() if old != new)
        print(
            f"{name} ({display_path(src.annotations)}): {result.images[name]} images, "
            f"{result.boxes[name]} boxes; {len(cmap)} categories, {remapped} ids remapped"
        )
        if result.missing_images[name]:
            print(f"  left out {result.missing_images[name]} listed images not found on disk")
        if result.dropped_boxes[name]:
            print(
                f"  left out {result.dropped_boxes[name]} boxes of left-out images or unknown "
                "categories"
            )
    for dropped in result.dropped_categories:
        print(f"dropped category {dropped}")
    print(f"categories: {', '.join(c['name'] for c in result.data['categories'])}")
    note = images_note(args.out, written.images_dir)
    if note:
        print(note)
    print(
        f"{result.summary()}; images in {display_path(written.images_dir)}: {written.linked} "
        f"hard-linked, {written.copied} copied, {written.existing} already there; wrote "
        f"{display_path(args.out)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
