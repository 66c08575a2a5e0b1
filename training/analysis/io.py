"""The analysis' CSV tables (mixed text and numbers; the trainer's all-numeric metrics.csv is read with
training.tracking.read_csv), and matplotlib without a display (the analysis writes files, never windows)."""

from __future__ import annotations

import csv
from pathlib import Path


def write_csv(rows: list[dict], path: str | Path) -> Path:
    """rows (dicts, union of keys in first-seen order) -> CSV; floats with 6 significant digits."""
    if not rows:
        raise ValueError(f"no rows to write to {path}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in row.items()})
    return path


def read_rows(path: str | Path) -> list[dict]:
    """CSV -> rows with numbers as floats and text kept (training.tracking.read_csv is for all-numeric logs)."""
    rows = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            rows.append({k: _cell(v) for k, v in row.items()})
    return rows


def _cell(text: str):
    if text in ("", None):
        return None
    try:
        return float(text)
    except ValueError:
        return text


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, works headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
