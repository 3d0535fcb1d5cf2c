"""``python -m detector.export CHECKPOINT ...`` is ``detector export CHECKPOINT ...``."""

import sys

from ..cli import main

sys.exit(main(["export", *sys.argv[1:]]))
