"""COCO dataset tools: validate, split, merge, stats, show (logic behind tools/*.py).

No torch import anywhere in this package: ``validate.validate_coco`` doubles as the trainer's
pre-flight check.
"""
