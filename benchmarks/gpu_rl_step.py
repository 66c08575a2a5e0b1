"""The figure users care about: what NormGuard costs in one RL step of an SD3.5-Medium-sized model.

    python -m benchmarks.gpu_rl_step --out DIR                 # CUDA: the real thing (about a minute on an H200)
    python -m benchmarks.gpu_rl_step --device cpu --tiny --out DIR   # the same code path on a tiny model, seconds

One RL step, as `training.loop` runs it for DiffusionNFT, on `SD3Transformer2DModel` built from SD3.5-Medium's
public transformer config (`SD35_MEDIUM`) with random weights and random prompt embeddings (no download: the cost
of a step does not depend on the weights' values), frozen in bf16, LoRA (peft, the trainer's
`FlowModel.configure_finetuning`, rank 32 / alpha 64 on the attention projections), under bf16 autocast:

  rollout    K Euler ODE steps (SD3's shift 3) from noise, no grad
             (the math of training.sampling: sigma_schedule, ode_step; inlined so that this one-shot GPU script
             depends only on the model API, and tested equal to it)
  policy     per training timestep: forward of the LoRA policy at x_t = (1 - s) x0 + s eps, with grad
  reference  the same forward with the adapter disabled (`FlowModel.reference()`), no grad
  loss       the fused ngkernels op on (v, u = eps - x0, v_ref), advantage-weighted:
               NormGuard off: flow_matching_loss(v, u, weight)
               NormGuard on:  fm_normguard_loss(v, u, v_ref, weight, ng_lambda=0.1, relative=True)
  backward   of the loss (the op's backward included), accumulated over the training timesteps
  optimizer  gradient clipping (1.0) and one AdamW update of the LoRA weights

Off and on differ only in the loss call: the reference forward runs in both, as in the trainer, where NFT's KL
term needs v_ref anyway. Steps alternate off/on (drift hits both alike); every phase is bracketed by CUDA events
and synchronised once per step; medians over the measured steps. The loss op alone (forward + backward on
tensors of the step's shape and dtype, latents fp32 as in the trainer) is timed too, because the step-level
difference of two ~seconds-long medians is within their noise: NormGuard's share of the step is reported both
ways, (step_on - step_off) / step_off and (op_on - op_off) / step_off; the goal is <= 1 %.

A time budget (`--budget-s`, counted from the start of the process) keeps the whole run inside a GPU lease: a
measured round that would end past it is not started, and a configuration that cannot fit is skipped; the table
says how many steps each median holds. Writes `<out>/rl_step-<device>.md` and `.csv`.

Without a CUDA device the script stops at once with exit code 2, unless `--device cpu --tiny` is given (a
4-layer model of the same architecture at tiny sizes: the rehearsal that tests/benchmarks/test_gpu_rl_step.py
runs).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import math
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

START = time.perf_counter()  # the budget counts from here: imports and the model build are part of the run

import torch  # noqa: E402

# SD3.5-Medium's transformer, as published in stabilityai/stable-diffusion-3.5-medium transformer/config.json
# (diffusers SD3Transformer2DModel): 24 MMDiT-X blocks of width 24 x 64 = 1536, the first 13 with dual (joint +
# image-only) attention, RMS-normed queries and keys; 16-channel latents of 1/8 the image size, 2x2 patches;
# T5 (4096) + CLIP (pooled 768 + 1280 = 2048) conditioning. 2.243 B parameters plus the 384^2 x 1536 positional-
# embedding buffer (0.226 B): 2.469 B values, the 4.94 GB of the published fp16 checkpoint. (Checked against two
# public copies of that config.json; tests/benchmarks/test_gpu_rl_step.py checks the count on the meta device.)
SD35_MEDIUM = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)
SD35_PROMPT_TOKENS = 333  # 77 CLIP tokens + 256 T5 tokens (max_sequence_length 256), what encode_prompt returns
VAE_FACTOR = 8

# The rehearsal: the same architecture (dual attention, qk norm, 16 latent channels) at tiny sizes.
TINY = dict(
    sample_size=16, patch_size=2, in_channels=16, num_layers=4, attention_head_dim=8, num_attention_heads=2,
    joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32, out_channels=16,
    pos_embed_max_size=32, dual_attention_layers=(0, 1), qk_norm="rms_norm",
)
TINY_PROMPT_TOKENS = 8

PHASES = ("rollout", "policy", "reference", "loss", "backward", "optimizer")
MODES = ("off", "on")
NG_LAMBDA = 0.1  # the shipped sd35m_nft_pickscore config's NormGuard: lambda 0.1, relative hinge
SHIFT = 3.0  # SD3's sampler shift
LATENT_DTYPE = torch.float32  # the trainer's latents; the bf16 transformer runs under autocast
CSV_COLUMNS = ("device", "torch", "triton", "ngkernels", "git_commit", "date", "config", "resolution", "batch",
               "rollout_steps", "train_timesteps", "lora_r", "mode", "phase", "median_ms", "min_ms", "max_ms", "n",
               "notes")


class UsageError(Exception):
    """A one-line error for the command line (exit code 2)."""


@dataclass
class RunConfig:
    name: str  # e.g. "512px"
    resolution: int  # pixels
    batch: int

    def latent_shape(self, channels: int) -> tuple[int, int, int]:
        side = self.resolution // VAE_FACTOR
        return (channels, side, side)


# ---------------------------------------------------------------------------------------------------
# Timing

class PhaseTimer:
    """Sums the time of named phases within one step. CUDA: event pairs, read after one synchronise per step
    (no synchronisation between phases, so the timed work runs as it would untimed). CPU: perf_counter."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, object, object]] = []

    @contextlib.contextmanager
    def phase(self, name: str):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
        else:
            start = time.perf_counter()
            yield
            end = time.perf_counter()
        self.marks.append((name, start, end))

    def totals_ms(self) -> dict[str, float]:
        if self.cuda:
            torch.cuda.synchronize()
        out: dict[str, float] = {}
        for name, start, end in self.marks:
            ms = start.elapsed_time(end) if self.cuda else (end - start) * 1e3
            out[name] = out.get(name, 0.0) + ms
        self.marks.clear()
        return out


def time_op_ms(fn, device: torch.device, reps: int, warmup: int = 3) -> list[float]:
    """Per-call times of fn() (forward + backward of the loss op)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        timer = PhaseTimer(device)
        with timer.phase("op"):
            fn()
        times.append(timer.totals_ms()["op"])
    return times


# ---------------------------------------------------------------------------------------------------
# The model

def build_flow_model(arch: dict, device: torch.device, lora_r: int, lora_alpha: float):
    """SD3Transformer2DModel(**arch) with random weights, frozen in bf16 on `device`, wrapped like the trainer's
    "sd3" model (same velocity call) with the trainer's LoRA set-up."""
    from diffusers import SD3Transformer2DModel

    from training.models.base import FlowModel
    from training.models.sd3 import SD3FlowModel

    class RandomSD3(FlowModel):
        """The trainer's SD3 velocity (timestep = 1000 sigma) over a transformer with no pipeline around it."""

        predict_velocity = SD3FlowModel.predict_velocity

    # Built directly on the device: the default initialisers (uniform fills) run there, not on the CPU; then cast.
    with torch.device(device):
        transformer = SD3Transformer2DModel(**arch)
    transformer.to(device=device, dtype=torch.bfloat16)
    side = arch["sample_size"]
    model = RandomSD3(transformer, (arch["in_channels"], side, side))
    model.configure_finetuning("lora", lora_r=lora_r, lora_alpha=lora_alpha)
    return model.to(device)


def make_batch(arch: dict, prompt_tokens: int, cfg: RunConfig, device: torch.device, seed: int):
    """Random prompt conditioning, rollout noise and advantages for one configuration (fixed across steps)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    B = cfg.batch
    cond = {"encoder_hidden_states": torch.randn(B, prompt_tokens, arch["joint_attention_dim"], generator=g),
            "pooled_projections": torch.randn(B, arch["pooled_projection_dim"], generator=g)}
    cond = {k: v.to(device=device, dtype=torch.bfloat16) for k, v in cond.items()}
    x1 = torch.randn(B, *cfg.latent_shape(arch["in_channels"]), generator=g).to(device=device, dtype=LATENT_DTYPE)
    advantages = torch.randn(B, generator=g).clamp(-5, 5).to(device)
    return cond, x1, advantages


def sigma_schedule(num_steps: int, shift: float) -> torch.Tensor:
    """num_steps + 1 sigmas from 1 to 0, SD3-shifted: shift s / (1 + (shift - 1) s) (training.sampling's)."""
    s = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)
    return (shift * s / (1 + (shift - 1) * s)).float()


def euler_sample(model, cond: dict, x1: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """The rollout: Euler ODE steps x <- x + (sigma_next - sigma) v from noise x1 (training.sampling.sample)."""
    x = x1
    grid = sigmas.tolist()
    for sigma, sigma_next in zip(grid[:-1], grid[1:]):
        v = model.velocity(x, torch.full((x.shape[0],), sigma, device=x.device), cond)
        x = x + (sigma_next - sigma) * v
    return x


def pick_train_sigmas(sigmas: torch.Tensor, batch: int, num_timesteps: int, seed: int) -> torch.Tensor:
    """[batch, num_timesteps] distinct random picks among the sampler's sigmas without the final 0 (NFT's
    "sampler" scheme of training.sampling.train_sigmas)."""
    g = torch.Generator().manual_seed(seed)
    grid = sigmas[:-1]
    return torch.stack([grid[torch.randperm(len(grid), generator=g)[:num_timesteps]] for _ in range(batch)])


def loss_fn(mode: str):
    import ngkernels

    if mode == "off":
        return lambda v, u, v_ref, w: ngkernels.flow_matching_loss(v, u, weight=w)
    return lambda v, u, v_ref, w: ngkernels.fm_normguard_loss(v, u, v_ref, weight=w, ng_lambda=NG_LAMBDA,
                                                               relative=True)


def rl_step(model, optimizer, params, mode: str, cond, x1, advantages, sigmas, train_timesteps: int,
            device: torch.device, step: int) -> tuple[dict[str, float], float]:
    """One RL step with every phase timed; returns (phase -> ms, including "step"; the last loss value)."""
    timer = PhaseTimer(device)
    loss_op = loss_fn(mode)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    B = x1.shape[0]
    with timer.phase("step"):
        with timer.phase("rollout"), torch.no_grad(), autocast:
            x0 = euler_sample(model, cond, x1, sigmas)
        item_sigmas = pick_train_sigmas(sigmas, B, train_timesteps, seed=step).to(device)  # [B, T]
        weight = advantages / 10 + 0.5  # NFT's r = clamp(A, -5, 5) / 5 / 2 + 1/2, in [0, 1]
        loss = None
        for t in range(train_timesteps):
            s = item_sigmas[:, t]
            eps = torch.randn_like(x0)
            x_t = (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * eps
            u = eps - x0
            with timer.phase("policy"), autocast:
                v = model.velocity(x_t, s, cond)
            with timer.phase("reference"), torch.no_grad(), autocast, model.reference():
                v_ref = model.velocity(x_t, s, cond)
            with timer.phase("loss"):
                loss = loss_op(v, u, v_ref, weight) / train_timesteps
            with timer.phase("backward"):
                loss.backward()
        with timer.phase("optimizer"):
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    times = timer.totals_ms()
    return times, float(loss.detach())


def op_times(mode: str, shape: tuple, device: torch.device, reps: int) -> list[float]:
    """The loss op alone, forward + backward, at the step's per-timestep shape and dtype."""
    g = torch.Generator(device="cpu").manual_seed(7)
    v = torch.randn(shape, generator=g).to(device=device, dtype=LATENT_DTYPE).requires_grad_(True)
    u = torch.randn(shape, generator=g).to(device=device, dtype=LATENT_DTYPE)
    v_ref = (torch.randn(shape, generator=g) * 0.5).to(device=device, dtype=LATENT_DTYPE)  # hinge active
    w = torch.rand(shape[0], generator=g).to(device)
    op = loss_fn(mode)

    def full_pass():
        op(v, u, v_ref, w).backward()
        v.grad = None

    return time_op_ms(full_pass, device, reps)


# ---------------------------------------------------------------------------------------------------
# One configuration, alternated off/on, under the budget

def run_config(model, optimizer, params, arch, prompt_tokens, cfg: RunConfig, args, device, deadline: float,
               log) -> dict:
    cond, x1, advantages = make_batch(arch, prompt_tokens, cfg, device, seed=cfg.resolution)
    sigmas = sigma_schedule(args.rollout_steps, SHIFT)
    samples = {m: [] for m in MODES}
    losses = {m: [] for m in MODES}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    step = 0
    notes = []
    for rnd in range(args.warmup + args.steps):
        measured = rnd >= args.warmup
        if measured and samples["off"]:
            last_round_s = (samples["off"][-1]["step"] + samples["on"][-1]["step"]) / 1e3
            if time.perf_counter() + last_round_s > deadline:
                notes.append(f"budget: {len(samples['off'])} of {args.steps} measured steps")
                log(f"  {cfg.name}: budget reached after {len(samples['off'])} measured steps per mode")
                break
        for mode in MODES:
            step += 1
            times, loss = rl_step(model, optimizer, params, mode, cond, x1, advantages, sigmas,
                                  args.train_timesteps, device, step)
            losses[mode].append(loss)
            if measured:
                samples[mode].append(times)
            log(f"  {cfg.name} round {rnd} ({'measured' if measured else 'warm-up'}) NormGuard {mode}: "
                f"step {times['step']:.1f} ms, loss {loss:.4g}")
    op_shape = (cfg.batch, *cfg.latent_shape(arch["in_channels"]))
    ops = {m: op_times(m, op_shape, device, args.op_reps) for m in MODES}
    peak_gib = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else float("nan")
    if not all(math.isfinite(x) for m in MODES for x in losses[m]):
        notes.append("non-finite loss")
    return {"cfg": cfg, "samples": samples, "ops": ops, "op_shape": op_shape, "peak_gib": peak_gib,
            "notes": notes, "losses": losses}


def summarise(result: dict) -> dict:
    """Medians per mode and phase, and NormGuard's share of the step two ways."""
    med = {}
    for mode in MODES:
        rows = result["samples"][mode]
        med[mode] = {p: statistics.median(r.get(p, 0.0) for r in rows) for p in ("step", *PHASES)} if rows else {}
    op = {m: statistics.median(result["ops"][m]) for m in MODES}
    out = {"median": med, "op": op, "n": len(result["samples"]["off"])}
    if out["n"]:
        step_off = med["off"]["step"]
        out["share_step"] = (med["on"]["step"] - step_off) / step_off
        out["share_op"] = (op["on"] - op["off"]) / step_off
        out["op_on_fraction"] = op["on"] / step_off
    return out


# ---------------------------------------------------------------------------------------------------
# Output

def _count(n: int) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e8 else f"{n / 1e6:.3f} M" if n >= 1e5 else f"{n:,}"


def _pct(x: float) -> str:
    return f"{100 * x:+.2f} %"


def markdown(results: list[dict], env: dict, args, arch_name: str, n_params: int, n_trainable: int,
             build_s: float, skipped: list[str]) -> str:
    lines = [f"# One RL step of {arch_name} with LoRA, NormGuard off vs on: {env['device']}", "",
             f"torch {env['torch']}, triton {env['triton']}, ngkernels {env['ngkernels']}, commit "
             f"{env['git_commit'] or '?'}, {env['date']}. Random weights (bf16, {_count(n_params)} parameters), "
             f"LoRA r {args.lora_r} / alpha {args.lora_alpha} on the attention projections ({_count(n_trainable)} "
             f"trainable), bf16 autocast, fp32 latents; rollout {args.rollout_steps} Euler steps (shift {SHIFT}); "
             f"{args.train_timesteps} training timesteps per item; NormGuard on = fm_normguard_loss(ng_lambda "
             f"{NG_LAMBDA}, relative), off = flow_matching_loss; the reference forward runs in both. Medians of "
             f"alternated steps after {args.warmup} warm-up round(s); model built in {build_s:.1f} s.", ""]
    for res in results:
        cfg, s = res["cfg"], summarise(res)
        memory = "" if math.isnan(res["peak_gib"]) else f", peak memory {res['peak_gib']:.1f} GiB"
        lines.append(f"## {cfg.name}: batch {cfg.batch}, latents {list(res['op_shape'])}, "
                     f"{s['n']} measured step(s) per mode{memory}")
        lines.append("")
        if not s["n"]:
            lines += ["no measured step (budget)", ""]
            continue
        lines += ["| phase | off (ms) | on (ms) | on - off (ms) | share of the step (off) |", "|---|---|---|---|---|"]
        step_off = s["median"]["off"]["step"]
        for phase in (*PHASES, "step"):
            off, on = s["median"]["off"][phase], s["median"]["on"][phase]
            lines.append(f"| {phase} | {off:.2f} | {on:.2f} | {on - off:+.2f} | {100 * off / step_off:.1f} % |")
        goal = "meets" if s["share_op"] <= 0.01 else "MISSES"
        lines += ["",
                  f"- loss op alone, forward + backward on {list(res['op_shape'])} fp32: off {s['op']['off']:.3f} ms, "
                  f"on {s['op']['on']:.3f} ms",
                  f"- NormGuard's share of the step, from the op: (op_on - op_off) / step = {_pct(s['share_op'])} "
                  f"({goal} the <= 1 % goal); the whole fused op is {100 * s['op_on_fraction']:.3f} % of the step",
                  f"- from the step medians: (step_on - step_off) / step_off = {_pct(s['share_step'])} "
                  "(includes step-to-step noise)"]
        if res["notes"]:
            lines.append(f"- notes: {'; '.join(res['notes'])}")
        lines.append("")
    for line in skipped:
        lines += [f"## {line}", ""]
    return "\n".join(lines)


def csv_rows(results: list[dict], env: dict, args) -> list[dict]:
    rows = []
    base = {k: env[k] for k in ("device", "torch", "triton", "ngkernels", "git_commit", "date")}
    for res in results:
        cfg = res["cfg"]
        common = dict(base, config=cfg.name, resolution=cfg.resolution, batch=cfg.batch,
                      rollout_steps=args.rollout_steps, train_timesteps=args.train_timesteps, lora_r=args.lora_r,
                      notes="; ".join(res["notes"]))
        for mode in MODES:
            for phase in ("step", *PHASES):
                xs = [r.get(phase, 0.0) for r in res["samples"][mode]]
                if xs:
                    rows.append(dict(common, mode=mode, phase=phase, median_ms=statistics.median(xs), min_ms=min(xs),
                                     max_ms=max(xs), n=len(xs)))
            xs = res["ops"][mode]
            rows.append(dict(common, mode=mode, phase="loss_op_fwd_bwd", median_ms=statistics.median(xs),
                             min_ms=min(xs), max_ms=max(xs), n=len(xs)))
    return rows


def write_outputs(out_dir: Path, env: dict, md: str, rows: list[dict]) -> dict:
    from benchmarks.results import device_slug

    out_dir.mkdir(parents=True, exist_ok=True)
    slug = device_slug(env["device"])
    paths = {"md": out_dir / f"rl_step-{slug}.md", "csv": out_dir / f"rl_step-{slug}.csv"}
    paths["md"].write_text(md + "\n")
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in row.items()})
    return paths


# ---------------------------------------------------------------------------------------------------
# Command line

def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_rl_step", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--tiny", action="store_true", help="a tiny model of the same architecture (the CPU rehearsal)")
    p.add_argument("--out", type=Path, default=Path(".benchmarks/rl_step"), help="folder for the .md and .csv")
    p.add_argument("--resolutions", type=int, nargs="+", default=None,
                   help="image sizes in pixels (default 512 1024; --tiny: 64 128)")
    p.add_argument("--batch", type=int, nargs="+", default=None,
                   help="batch per resolution (default 8 at 512, 2 at 1024; --tiny: 2)")
    p.add_argument("--rollout-steps", type=int, default=10)
    p.add_argument("--train-timesteps", type=int, default=2, help="training timesteps per item and step")
    p.add_argument("--lora-r", type=int, default=None, help="LoRA rank (default 32; --tiny: 4)")
    p.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default 2 x rank)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up rounds (one off and one on step each)")
    p.add_argument("--steps", type=int, default=3, help="measured steps per mode")
    p.add_argument("--op-reps", type=int, default=20, help="timed calls of the loss op alone")
    p.add_argument("--budget-s", type=float, default=80.0, help="wall-clock budget from process start")
    args = p.parse_args(argv)
    if args.resolutions is None:
        args.resolutions = [64, 128] if args.tiny else [512, 1024]
    if args.batch is None:
        args.batch = [2] * len(args.resolutions) if args.tiny else [{512: 8, 1024: 2}.get(r, 2)
                                                                      for r in args.resolutions]
    if len(args.batch) == 1:
        args.batch = args.batch * len(args.resolutions)
    if len(args.batch) != len(args.resolutions):
        raise UsageError(f"--batch needs one value or one per resolution ({len(args.resolutions)}), "
                         f"got {len(args.batch)}")
    if args.lora_r is None:
        args.lora_r = 4 if args.tiny else 32
    if args.lora_alpha is None:
        args.lora_alpha = 2.0 * args.lora_r
    for name in ("rollout_steps", "train_timesteps", "steps", "op_reps", "lora_r"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0 or min(args.batch) < 1:
        raise UsageError("--warmup must be >= 0 and every --batch >= 1")
    if args.train_timesteps > args.rollout_steps:
        raise UsageError(f"--train-timesteps ({args.train_timesteps}) cannot exceed --rollout-steps "
                         f"({args.rollout_steps}): they are picked among the sampler's sigmas")
    for r in args.resolutions:
        if r % (VAE_FACTOR * 2):
            raise UsageError(f"resolution {r} must be a multiple of {VAE_FACTOR * 2} (VAE factor x patch size)")
    return args


def check_device(args) -> torch.device:
    if args.device == "cuda":
        if not torch.cuda.is_available():
            raise UsageError("no CUDA device: this benchmark needs a GPU (rehearse with --device cpu --tiny)")
    elif not args.tiny:
        raise UsageError("the SD3.5-Medium-sized step on CPU would take hours: add --tiny for the CPU rehearsal")
    try:
        import diffusers  # noqa: F401
        import peft  # noqa: F401
    except ImportError as err:
        raise UsageError(f"{err.name} is not importable ({err}); on the GPU image install the wheels that "
                         "scripts/fetch_gpu_wheels.sh fetched into .whl/") from None
    return torch.device(args.device)


def main(argv=None) -> int:
    try:
        args = parse_args(argv)
        device = check_device(args)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    from benchmarks.results import environment

    def log(msg: str):
        print(f"[{time.perf_counter() - START:6.1f} s] {msg}", flush=True)

    deadline = START + args.budget_s
    if device.type == "cpu":  # the tiny model's matrices are too small for intra-op threads to pay off
        torch.set_num_threads(1)
    arch, prompt_tokens = (TINY, TINY_PROMPT_TOKENS) if args.tiny else (SD35_MEDIUM, SD35_PROMPT_TOKENS)
    arch_name = "a tiny SD3.5-architecture transformer" if args.tiny else "SD3.5-Medium (random weights)"
    env = environment(device)
    log(f"{env['device']}, torch {env['torch']}, triton {env['triton']}; building {arch_name}")
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = build_flow_model(arch, device, args.lora_r, args.lora_alpha)
    if device.type == "cuda":
        torch.cuda.synchronize()
    build_s = time.perf_counter() - t0
    params = model.trainable_parameters()
    n_params = sum(p.numel() for p in model.transformer.get_base_model().parameters()) - sum(
        p.numel() for p in params)
    n_trainable = sum(p.numel() for p in params)
    log(f"built in {build_s:.1f} s: {_count(n_params)} frozen parameters, {_count(n_trainable)} LoRA")
    optimizer = torch.optim.AdamW(params, lr=3e-4, weight_decay=1e-4)

    configs = [RunConfig(f"{r}px", r, b) for r, b in zip(args.resolutions, args.batch)]
    results, skipped = [], []  # skipped: "<name>: <why>"
    failed = False
    for cfg in configs:
        if results and results[-1]["samples"]["off"]:
            # a rough cost of this configuration: the last one's round, scaled by tokens, x (warm-up + 1 round)
            prev = results[-1]
            prev_round = (statistics.median(r["step"] for r in prev["samples"]["off"]) +
                          statistics.median(r["step"] for r in prev["samples"]["on"])) / 1e3
            scale = (cfg.batch * cfg.resolution ** 2) / (prev["cfg"].batch * prev["cfg"].resolution ** 2)
            estimate = prev_round * scale * (args.warmup + 1)
            if time.perf_counter() + estimate > deadline:
                log(f"{cfg.name}: skipped, about {estimate:.0f} s would pass the {args.budget_s:.0f} s budget")
                skipped.append(f"{cfg.name}: skipped (about {estimate:.0f} s more would pass the "
                               f"{args.budget_s:.0f} s budget)")
                continue
        log(f"{cfg.name}: batch {cfg.batch}, {args.rollout_steps} rollout steps, {args.train_timesteps} timesteps")
        try:
            results.append(run_config(model, optimizer, params, arch, prompt_tokens, cfg, args, device, deadline,
                                      log))
        except Exception as err:  # noqa: BLE001  (one configuration failing, e.g. out of memory, keeps the others)
            traceback.print_exc()
            reason = " ".join(f"{type(err).__name__}: {err}".split())[:300]
            log(f"{cfg.name}: FAILED ({reason})")
            skipped.append(f"{cfg.name}: FAILED ({reason})")
            failed = True
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()

    md = markdown(results, env, args, arch_name, n_params, n_trainable, build_s, skipped)
    paths = write_outputs(args.out, env, md, csv_rows(results, env, args))
    print(md)
    log(f"wrote {paths['md']} and {paths['csv']}")
    measured = [r for r in results if r["samples"]["off"]]
    if not measured:
        print("error: no configuration was measured within the budget", file=sys.stderr)
        return 1
    if any("non-finite loss" in r["notes"] for r in results):
        print("error: a loss was not finite (see the notes in the table)", file=sys.stderr)
        return 1
    if failed:
        print("error: a configuration failed (see the table)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
