#!/usr/bin/env bash
# Build the two data sets of the transfer experiment from the shared exports, with the
# project's own tools only (convert, merge, split). Run from the repository root:
#
#   bash benchmarks/transfer/prepare.sh
#
# Writes (both git-ignored):
#   datasets/deer/          deer-automl converted to COCO, split 80/20 with seed 0
#                           -> annotations.json, train.json, val.json, images/
#   runs/transfer/data/base/  the "earlier detector" base classes: coco128 people & vehicles
#                           (official JSON), raccoon-voc, rabbit Roboflow export, merged, split
#                           80/20 with seed 0 -> merged.json, train.json, val.json, images/
# SHARED (default ../shared) points at the shared datasets; OUT_DEER / OUT_BASE move the outputs.
# Re-running replaces earlier outputs (same input, same seed: identical files).
set -euo pipefail

SHARED=${SHARED:-../shared}
DATA=$SHARED/datasets
OUT_DEER=${OUT_DEER:-datasets/deer}
OUT_BASE=${OUT_BASE:-runs/transfer/data/base}
PY=${PYTHON:-python}
# COCO's person and vehicle categories (coco128 has no train/boat/airplane boxes worth a class).
BASE_COCO_NAMES=${BASE_COCO_NAMES:-person,bicycle,car,motorcycle,bus,truck}

for d in "$DATA/deer-automl" "$DATA/coco128" "$DATA/raccoon-voc" "$DATA/rabbit-roboflow-labelstudio"; do
  [ -d "$d" ] || { echo "prepare.sh: $d not found (set SHARED=<folder holding datasets/>)" >&2; exit 1; }
done

echo "== deer: convert (AutoML CSV) and split (val 0.2, seed 0) -> $OUT_DEER"
"$PY" tools/convert.py "$DATA/deer-automl" --from automl --out "$OUT_DEER" --overwrite
"$PY" tools/split.py "$OUT_DEER/annotations.json" --val 0.2 --seed 0 --no-progress

echo "== base classes -> $OUT_BASE"
SRC=$OUT_BASE/sources
rm -rf "$OUT_BASE"
mkdir -p "$SRC"
# coco128, official JSON, only people & vehicles (other labels are dropped; images left with no
# box stay as negatives).
"$PY" tools/convert.py "$DATA/coco128/annotations/instances_train2017.json" --from coco \
  --images "$DATA/coco128/images/train2017" --names "$BASE_COCO_NAMES" --out "$SRC/coco128"
"$PY" tools/convert.py "$DATA/raccoon-voc" --from voc --out "$SRC/raccoon"
# The Roboflow file lists 400 images, 197 are present: the converter names each of the 203
# missing ones; those lines are left out here (the summary line counts them).
"$PY" tools/convert.py "$DATA/rabbit-roboflow-labelstudio/train/_annotations.coco.json" --from coco \
  --out "$SRC/rabbit" 2>&1 | { grep -v "image file not found in" || true; }
"$PY" tools/merge.py "$SRC/coco128/annotations.json" "$SRC/raccoon/annotations.json" \
  "$SRC/rabbit/annotations.json" --names coco128 raccoon rabbit --drop-empty --copy \
  --out "$OUT_BASE/merged.json" --no-progress
"$PY" tools/split.py "$OUT_BASE/merged.json" --val 0.2 --seed 0 --no-progress

echo "== done"
echo "deer: $OUT_DEER/train.json $OUT_DEER/val.json"
echo "base: $OUT_BASE/train.json $OUT_BASE/val.json"
