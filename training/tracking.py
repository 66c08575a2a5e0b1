"""Run logs: the trackers of `log.trackers` (a CSV tracker, always on, plus accelerate's TensorBoard and wandb
trackers), images to every tracker that takes them, and the end-of-run plot.

Why accelerate's tracker API: the same `log` / `log_images` calls reach every tracker, only the main process
writes, and a further tracker (mlflow, aim ...) is one more entry here. accelerate silently drops a tracker
whose package is missing (a debug log line), so `check_trackers` turns that into a config error before any
work starts.
"""

from __future__ import annotations

import csv
import importlib
import math
from pathlib import Path

from accelerate.tracking import GeneralTracker

# tracker name -> the package it needs (csv needs none)
TRACKER_PACKAGES = {"csv": None, "tensorboard": "tensorboard", "wandb": "wandb"}
WANDB_PROJECT = "ngkernels"


def check_trackers(names) -> None:
    """ValueError naming the tracker and the package when a tracker of `log.trackers` cannot be imported."""
    for name in names:
        if name not in TRACKER_PACKAGES:
            raise ValueError(f"log.trackers: unknown tracker {name!r}; known: {list(TRACKER_PACKAGES)}")
        package = TRACKER_PACKAGES[name]
        if package is None:
            continue
        try:
            importlib.import_module(package)
        except ImportError:
            extra = f" or pip install -e '.[{name}]'" if name == "wandb" else ""
            raise ValueError(f"log.trackers: the {name!r} tracker needs the Python package {package!r}, which is not "
                             f"installed (pip install {package}{extra}; or drop {name} from log.trackers)") from None


def accelerate_trackers(names, run_dir: str | Path, run_name: str) -> list[GeneralTracker]:
    """accelerate tracker objects for `Accelerator(log_with=...)`: TensorBoard under <run_dir>/tensorboard, wandb
    (project "ngkernels", run named after the run) under <run_dir>/wandb. wandb honours WANDB_MODE: offline
    writes a local run that `wandb sync <run_dir>/wandb/offline-run-*` uploads later."""
    check_trackers(names)
    from accelerate.tracking import TensorBoardTracker, WandBTracker

    out = []
    if "tensorboard" in names:
        out.append(TensorBoardTracker("tensorboard", str(run_dir)))
    if "wandb" in names:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        out.append(WandBTracker(WANDB_PROJECT, name=run_name, dir=str(run_dir)))
    return out


def log_images(trackers, images: dict, step: int) -> None:
    """{key: uint8 array [H, W, 3]} to every tracker that takes images (TensorBoard add_images, wandb.Image)."""
    for tracker in trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({k: v[None] for k, v in images.items()}, step=step, dataformats="NHWC")
        elif tracker.name == "wandb":
            tracker.log_images({k: [v] for k, v in images.items()}, step=step)


class CSVTracker(GeneralTracker):
    """One row per logged step, fixed columns (empty where a step has no value); flushed every row.

    On resume the rows after the resumed step are dropped first, so the file never holds steps that the
    checkpoint does not (a kill -9 between checkpoints loses those rows with the steps).
    """

    name = "csv"
    requires_logging_directory = False
    main_process_only = True

    def __init__(self, path: str | Path, columns: list[str], resume_step: int | None = None):
        super().__init__()
        self.path = Path(path)
        self.columns = ["step", *columns]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.is_file():
            with open(self.path, newline="") as f:
                kept = [row for row in csv.DictReader(f) if int(row["step"]) <= resume_step]
            self._file = open(self.path, "w", newline="")
            self._writer = csv.DictWriter(self._file, fieldnames=self.columns, extrasaction="raise")
            self._writer.writeheader()
            self._writer.writerows({k: row.get(k, "") for k in self.columns} for row in kept)
        else:
            self._file = open(self.path, "w", newline="")
            self._writer = csv.DictWriter(self._file, fieldnames=self.columns, extrasaction="raise")
            self._writer.writeheader()
        self._file.flush()

    @property
    def tracker(self):
        return self._writer

    def store_init_configuration(self, values: dict):
        pass  # the run directory's config.yaml holds the configuration

    def log(self, values: dict, step: int | None = None, **kwargs):
        unknown = set(values) - set(self.columns)
        if unknown:
            raise ValueError(f"CSV log: columns {sorted(unknown)} were not declared")
        cells = {k: "" if isinstance(v, float) and math.isnan(v) else v for k, v in values.items()}
        self._writer.writerow({"step": step, **cells})
        self._file.flush()

    def finish(self):
        self._file.close()


def read_csv(path: str | Path) -> list[dict[str, float]]:
    """Rows of a metrics CSV as floats (NaN where empty)."""
    with open(path, newline="") as f:
        return [{k: float(v) if v not in ("", None) else math.nan for k, v in row.items()} for row in csv.DictReader(f)]


def plot_run(csv_path: str | Path, png_path: str | Path, title: str = "", eval_before: float | None = None) -> Path:
    """Reward (rollout mean and evaluation, with the before-training evaluation at step 0) and norm ratio
    ||v||/||v_ref|| (overall and per sigma bucket) vs step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_csv(csv_path)
    steps = [r["step"] for r in rows]
    fig, (ax_r, ax_n) = plt.subplots(1, 2, figsize=(11, 4))
    ax_r.plot(steps, [r["reward_mean"] for r in rows], label="rollout reward (mean)")
    evals = [(r["step"], r["eval_reward"]) for r in rows if not math.isnan(r.get("eval_reward", math.nan))]
    if eval_before is not None:
        evals.insert(0, (0.0, eval_before))
    if evals:
        ax_r.plot(*zip(*evals), "o-", label="eval reward")
    ax_r.set_xlabel("step")
    ax_r.set_ylabel("reward")
    ax_r.legend()
    ax_r.grid(alpha=0.3)
    for key in [k for k in (rows[0] if rows else {}) if k.startswith("norm_ratio")]:
        ax_n.plot(steps, [r[key] for r in rows], label=key.replace("norm_ratio/", "sigma "),
                  linewidth=2.0 if key == "norm_ratio" else 1.0)
    ax_n.axhline(1.0, color="gray", linestyle="--", linewidth=0.8)
    ax_n.set_xlabel("step")
    ax_n.set_ylabel("||v_theta|| / ||v_ref||")
    ax_n.legend(fontsize=8)
    ax_n.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return save_figure(fig, png_path)


def save_figure(fig, path: str | Path) -> Path:
    """Lays out, writes (creating its folder) and closes a matplotlib figure: every PNG of the trainer and the
    analysis goes through here."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
