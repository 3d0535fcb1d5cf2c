"""Label-export converters to COCO (``tools/convert.py`` is the command line).

    from detector.convert import convert, detect_format
    report = convert("../shared/datasets/raccoon-voc", "datasets/raccoon")
    print(report.text())

One module per format family, each a reader function ``read_x(ctx) -> ReadResult`` listed in
the plain dict ``FORMATS``; ``build.py`` turns any ReadResult into the COCO output.
"""

from .build import ANNOTATIONS_NAME, IMAGES_DIR, ConversionReport
from .common import ConversionError, FormatDetectionError, Skipped
from .core import FORMATS, convert, read
from .detect import detect, detect_format

__all__ = [
    "ANNOTATIONS_NAME",
    "FORMATS",
    "IMAGES_DIR",
    "ConversionError",
    "ConversionReport",
    "FormatDetectionError",
    "Skipped",
    "convert",
    "detect",
    "detect_format",
    "read",
]
