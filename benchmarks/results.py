"""Where results go and what each row says about its run: the CSV columns, the environment (device,
versions, commit, load), and the per-device CSV that runs upsert into.

Every row keeps its own date, versions and copy bandwidth, so nothing is compared across runs without
saying so.
"""

from __future__ import annotations

import csv
import datetime
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

import ngkernels

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"

CSV_COLUMNS = (
    "device", "device_type", "torch", "triton", "ngkernels", "git_commit", "date", "load_avg", "threads",
    "op", "impl", "mode", "shape", "dims", "dtype",
    "median_ms", "p20_ms", "p80_ms", "timer", "cudagraph_ms",
    "min_bytes", "eff_gbps", "copy_gbps", "bw_fraction",
    "launches_kernels", "launches_memsets", "kernel_names",
    "peak_extra_mib", "grad_mib", "memory_method", "notes",
)
ROW_KEY = ("op", "impl", "mode", "shape", "dtype")


# ---------------------------------------------------------------------------------------------------
# The environment a row records

def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"CPU ({cores} cores)"


def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def environment(device: torch.device) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    return {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "ngkernels": ngkernels.__version__,
        "git_commit": _git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
        "python": platform.python_version(),
        # other work on the machine skews times: the 1-minute load average when the run started says how much
        "load_avg": f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "",
        "threads": torch.get_num_threads(),  # CPU: intra-op threads (see set_threads)
    }


# ---------------------------------------------------------------------------------------------------
# Results files

def default_results_dir(shape_set: str) -> Path:
    """Smoke runs never touch the committed results."""
    return REPO_ROOT / ".benchmarks" / "smoke" if shape_set == "smoke" else RESULTS_DIR


def results_paths(results_dir: Path, device: str) -> dict:
    slug = device_slug(device)
    return {ext: Path(results_dir) / f"{slug}.{ext}" for ext in ("csv", "md", "png")}


def read_rows(path: Path) -> list[dict]:
    if not Path(path).exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def upsert_rows(path: Path, rows: list[dict]) -> list[dict]:
    """Write rows into the CSV, replacing earlier rows with the same (op, impl, mode, shape, dtype); a run split
    over several calls (e.g. one per dtype) fills one file. Every row keeps its own date, versions and copy
    bandwidth, so nothing is compared across runs without saying so."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new_keys = {tuple(str(r[k]) for k in ROW_KEY) for r in rows}
    kept = [r for r in read_rows(path) if tuple(r[k] for k in ROW_KEY) not in new_keys]
    merged = kept + [{k: _fmt(r.get(k)) for k in CSV_COLUMNS} for r in rows]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(merged)
    return merged


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)
