"""One checkpoint, every instrument: reward, norm inflation and the quality proxy under plain sampling at several
step counts (few-step behaviour), under the inference-time renormalisation baseline, and the adjoint
sensitivity's batch coherence. Same seeds for every call, so checkpoints are compared on paired samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from training.analysis.adjoint import adjoint_sensitivity, coherence
from training.analysis.norms import inflation_percent, ratio_rows
from training.analysis.trajectory import Trace, repeat_prompts, traced_sample
from training.grids import head


@dataclass
class EvalSettings:
    prompts: list[str]
    samples_per_prompt: int = 8
    num_steps: int = 8  # the full number of sampler steps
    few_steps: tuple[int, ...] = (2, 4, 8)  # also evaluated with plain sampling (the full count is always added)
    rescale_phis: tuple[float, ...] = (0.5, 1.0)  # renormalisation baseline blends, at the full step count
    shift: float = 1.0
    sampler: str = "ode"
    guidance_scale: float = 1.0
    adjoint_samples_per_prompt: int = 2  # 0 skips the adjoint analysis
    seed: int = 1000  # evaluation noise (disjoint from training seeds)
    batch_size: int = 64
    progress: bool = True

    def step_counts(self) -> list[int]:
        return sorted({*self.few_steps, self.num_steps})


@dataclass
class CheckpointEval:
    """rows: one per sampling condition; ratio_by_step: per-step ratio rows at the full step count (plain);
    adjoint: per-step coherence rows; adjoint_total: the uniform scale's (all steps at once) coherence."""

    rows: list[dict]
    ratio_by_step: list[dict]
    adjoint: list[dict] = field(default_factory=list)
    adjoint_total: dict = field(default_factory=dict)
    shown: dict = field(default_factory=dict)  # condition name -> training.grids.head(trace): the grids' images


def _summarise(trace: Trace, reward, quality) -> dict:
    rewards = reward(trace.images, trace.prompts).double()
    row = {"reward_mean": rewards.mean().item(), "reward_std": rewards.std().item(),
           "norm_inflation_pct": inflation_percent(trace)}
    if quality is not None:
        row.update(quality(trace.images, trace.prompts))
    return row


def evaluate_checkpoint(model, reward, settings: EvalSettings, quality=None, label: str = "") -> CheckpointEval:
    """All instruments on the model's current (trained) policy against its reference."""
    prompts = repeat_prompts(settings.prompts, settings.samples_per_prompt)
    common = dict(shift=settings.shift, sampler=settings.sampler, guidance_scale=settings.guidance_scale,
                  seed=settings.seed, batch_size=settings.batch_size, progress=settings.progress)
    rows, ratio_by_step, shown = [], [], {}
    for steps in settings.step_counts():
        trace = traced_sample(model, prompts, num_steps=steps, desc=f"{label} plain {steps} steps", **common)
        rows.append({"sampling": "plain", "num_steps": steps, "phi": 0.0, **_summarise(trace, reward, quality)})
        shown[f"plain, {steps} steps"] = head(trace)
        if steps == settings.num_steps:
            ratio_by_step = ratio_rows(trace)
    for phi in settings.rescale_phis:
        trace = traced_sample(model, prompts, num_steps=settings.num_steps, rescale_phi=phi,
                              desc=f"{label} renorm phi={phi}", **common)
        rows.append({"sampling": "renorm", "num_steps": settings.num_steps, "phi": phi,
                     **_summarise(trace, reward, quality)})
        shown[f"renorm phi={phi:g}"] = head(trace)
    result = CheckpointEval(rows=rows, ratio_by_step=ratio_by_step, shown=shown)
    if settings.adjoint_samples_per_prompt > 0:
        grads, _, sigmas = adjoint_sensitivity(
            model, repeat_prompts(settings.prompts, settings.adjoint_samples_per_prompt), reward,
            num_steps=settings.num_steps, shift=settings.shift, sampler=settings.sampler,
            guidance_scale=settings.guidance_scale, seed=settings.seed, batch_size=settings.batch_size,
            progress=settings.progress)
        c = coherence(grads)
        result.adjoint = c.rows(sigmas)
        result.adjoint_total = {"total_mean_over_std": c.total_mean_over_std,
                                "total_frac_positive": c.total_frac_positive}
    return result


def write_analysis_grids(shown: dict, settings: EvalSettings, reward, out: Path, title: str = "") -> list[Path]:
    """Sample grids next to the tables: grid_plain.png (the full step count), grid_few_step.png (one row per step
    count) and grid_renorm.png (plain, then each renormalisation blend), same prompts and noise in every row."""
    from training.grids import trace_grid

    full = f"plain, {settings.num_steps} steps"
    few = [(f"{s} steps", shown[f"plain, {s} steps"]) for s in settings.step_counts()]
    renorm = [("plain", shown[full])] + [(k, v) for k, v in shown.items() if k.startswith("renorm")]
    return [trace_grid([(full, shown[full])], reward, out / "grid_plain.png", f"{title}  plain sampling"),
            trace_grid(few, reward, out / "grid_few_step.png", f"{title}  few-step sampling"),
            trace_grid(renorm, reward, out / "grid_renorm.png", f"{title}  renormalised to ||v_ref||")]


def load_checkpoint_weights(model, checkpoint: Path) -> None:
    """The trained model's weights from a trainer checkpoint folder (model.safetensors: the weights training
    changes, on top of the frozen ones `build_model` rebuilt), keys and shapes checked strictly."""
    from training.checkpoint import load_model_state

    load_model_state(model, Path(checkpoint))


def build_eval_model(cfg, checkpoint: str | None):
    """The run's model (with its method's extra policies, so checkpoint keys match) at `checkpoint`
    (None: the reference, i.e. the untouched LoRA init)."""
    from training.methods import build_method
    from training.models import build_model

    model = build_model(cfg)
    build_method(cfg).setup(model)
    if checkpoint is not None:
        load_checkpoint_weights(model, Path(checkpoint))
    return model.eval()
