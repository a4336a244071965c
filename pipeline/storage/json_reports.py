"""JSON reports that are JSON: numbers that are not finite are written as null.

Python's `json` writes an infinite PSNR (a noiseless input) or a NaN ratio (an input with
no measurable noise) as `Infinity` / `NaN`, which no strict JSON reader accepts. The
tables print them as `inf` / `nan`; the `--json` reports hold `null` in their place.
"""
from __future__ import annotations

import json
import math


def finite(value):
    """`value` with every float that is not finite, at any depth, replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def report_json(data: dict) -> str:
    """`data` as indented strict JSON (non-finite numbers as null)."""
    return json.dumps(finite(data), indent=2, allow_nan=False)
