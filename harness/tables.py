"""Markdown tables of mixed values (the report's, the IsoFLOP design's): numbers to 4 significant digits,
large and tiny ones in exponent form, NaN as "-"."""
from __future__ import annotations

import math
from typing import Any

import numpy as np


def _fmt(value: Any) -> str:
    if isinstance(value, (float, np.floating)):
        if math.isnan(value):
            return "-"
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3g}"
        return f"{value:.4g}"
    if isinstance(value, (int, np.integer)) and abs(int(value)) >= 1e5:
        return f"{float(value):.3g}"
    return str(value)


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
