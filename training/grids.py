"""Sample grids: what the policy draws, next to what the reference draws from the same noise.

Why: reward hacking (over-saturation, brightness drift, grid artifacts) shows in the images before any metric
moves, and every framework people come from logs sample images at each evaluation. A grid has one column per
fixed eval prompt and one row per policy (the reference, then the current policy); each image is labelled
with its reward and with its own ||v||/||v_ref||, the mean over its sampling steps of the per-step ratio of
the policy's velocity to the reference's at the policy's own x_t (ngkernels.velocity_norms). The reference
row's ratio is 1 by definition. Same prompts and same initial noise at every evaluation, so grids compare
across steps, and the noise of prompt k is the evaluation's noise of its first sample of that prompt, so the
grid shows images the evaluation reward averaged over.

This module renders (images + labels -> PNG, with nearest-neighbour upscaling for the toy's 16 px images)
and samples the grid's images through the model adapter (`FlowModel.decode`: the VAE for SD3 / FLUX, the
identity map for the toy). It knows nothing of the training loop: `EvalGrid` is handed the model, the
(possibly DDP/FSDP-wrapped) forward, the reward and the accelerator.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from training.sampling import policy_velocity, reference_coupled, sample, sigma_schedule

CELL = 128  # minimum cell size in pixels: a 16 px toy image is upscaled 8x (nearest)
MAX_CELL = 256  # larger images (SD3 / FLUX at 512-1024 px) are downscaled to this
PAD = 6
BACKGROUND = (255, 255, 255)
TEXT = (20, 20, 20)


@dataclass
class Cell:
    image: np.ndarray  # uint8 [H, W, 3]
    reward: float
    ratio: float  # mean over the sampling steps of ||v||/||v_ref|| along this image's own trajectory


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[N, 3, H, W] in [0, 1] -> uint8 [N, H, W, 3] (non-finite pixels become 0)."""
    x = images.detach().float().cpu().nan_to_num(0.0).clamp(0, 1)
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def cell_size(height: int) -> int:
    """Cell edge for images of this height: small images scale up by an integer factor (crisp pixels)."""
    if height >= MAX_CELL:
        return MAX_CELL
    return height * max(1, -(-CELL // height))


def resize(image: np.ndarray, size: int):
    """uint8 [H, W, 3] -> a size x size PIL image: nearest when enlarging (toy pixels stay crisp), Lanczos when
    shrinking."""
    from PIL import Image

    img = Image.fromarray(image)
    if img.height == size:
        return img
    method = Image.NEAREST if size > img.height else Image.LANCZOS
    return img.resize((size, size), method)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def render_grid(rows: list[tuple[str, list[Cell]]], prompts: list[str], title: str = "") -> np.ndarray:
    """A labelled grid as uint8 [H, W, 3]: one column per prompt (its text on top), one row per (name, cells)
    (its name on the left); under each image its reward and ||v||/||v_ref||."""
    from PIL import Image, ImageDraw

    if not rows or any(len(cells) != len(prompts) for _, cells in rows):
        raise ValueError("render_grid: every row needs one cell per prompt")
    size = cell_size(rows[0][1][0].image.shape[0])
    font, small = _font(12), _font(11)
    chars = max(8, size // 7)
    headers = [textwrap.wrap(p, chars)[:3] or [""] for p in prompts]
    line = 14
    header_h = line * max(len(h) for h in headers) + PAD
    label_w = 86
    caption_h = 2 * line + PAD
    title_h = line + 2 * PAD if title else PAD
    width = label_w + len(prompts) * (size + PAD) + PAD
    height = title_h + header_h + len(rows) * (size + caption_h + PAD)
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((PAD, PAD), title, fill=TEXT, font=font)
    for c, header in enumerate(headers):
        x = label_w + c * (size + PAD)
        for i, text in enumerate(header):
            draw.text((x, title_h + i * line), text, fill=TEXT, font=small)
    for r, (name, cells) in enumerate(rows):
        y = title_h + header_h + r * (size + caption_h + PAD)
        for i, text in enumerate(textwrap.wrap(name, 12)[:4]):
            draw.text((PAD, y + size // 2 - 2 * line + i * line), text, fill=TEXT, font=font)
        for c, cell in enumerate(cells):
            x = label_w + c * (size + PAD)
            canvas.paste(resize(cell.image, size), (x, y))
            draw.text((x, y + size + 2), f"reward {cell.reward:.3f}", fill=TEXT, font=small)
            draw.text((x, y + size + 2 + line), f"|v|/|v_ref| {cell.ratio:.3f}", fill=TEXT, font=small)
    return np.asarray(canvas)


def save_png(image: np.ndarray, path: str | Path) -> Path:
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path


def spread(pool: list[str], n: int) -> list[int]:
    """n indices spread over the pool, alternating odd/even offsets: on the toy's 16 captions (colour x shape x
    side, side fastest) this gives every colour, both shapes and both sides."""
    n = min(n, len(pool))
    if n == len(pool):
        return list(range(n))
    out: list[int] = []
    for i in range(n):
        k = (i * len(pool)) // n + (i % 2)
        if k >= len(pool) or k in out:
            k = (i * len(pool)) // n
        while k in out:
            k = (k + 1) % len(pool)
        out.append(k)
    return out


@torch.no_grad()
def traced_sample(model, cond: dict, x1: torch.Tensor, sigmas: torch.Tensor, *, forward=None,
                  guidance_scale: float = 1.0, uncond: dict | None = None, rescale_to_reference: bool = False,
                  rescale_phi: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """ODE sample of the model's policy in use from x1 -> (clean latents, per-image mean ||v||/||v_ref|| [N]).

    At every step the reference is evaluated at the policy's own x_t (one extra forward per step, the cost of
    the renormalisation baseline); the ratio is the raw guided velocity's, before any rescale."""
    guided = policy_velocity(model, cond, guidance_scale, uncond, forward=forward)
    ratios = []
    velocity = reference_coupled(model, guided, rescale_phi if rescale_to_reference else None, ratios)
    x0 = sample(velocity, x1, sigmas, "ode")
    return x0, torch.stack(ratios, 1).float().mean(1).cpu()


class EvalGrid:
    """Writes <out_dir>/step-XXXXXX.png at each call and logs it to the accelerator's image trackers.

    prompts: the grid's prompts; noise: [N, *latent_shape] initial noise, one per prompt (fixed for the run).
    The reference row is sampled once and reused (the reference policy never changes). Every process samples
    its share (round-robin, as the loop's evaluation does, so DDP/FSDP forwards stay collective) and the main
    process renders."""

    def __init__(self, model, reward, prompts: list[str], noise: torch.Tensor, num_steps: int, sampling,
                 accelerator, out_dir: str | Path, forward=None, title: str = ""):
        if len(prompts) != len(noise):
            raise ValueError(f"EvalGrid: {len(prompts)} prompts but {len(noise)} noise tensors")
        self.model, self.reward, self.prompts, self.noise = model, reward, list(prompts), noise
        self.sigmas = sigma_schedule(num_steps, sampling.shift)
        self.sampling, self.accelerator, self.forward = sampling, accelerator, forward
        self.out_dir, self.title = Path(out_dir), title
        self._reference: list | None = None
        self.paths: dict[int, Path] = {}

    def _local(self) -> list[int]:
        acc = self.accelerator
        return list(range(acc.process_index, len(self.prompts), acc.num_processes))

    def _sample(self, policy: str) -> list:
        """-> [(index, uint8 image, reward, ratio)] of this process's prompts."""
        local = self._local()
        if not local:
            return []
        device = self.accelerator.device
        prompts = [self.prompts[j] for j in local]
        s = self.sampling
        cond = self.model.encode_prompts(prompts)
        uncond = self.model.encode_prompts([""] * len(prompts)) if s.guidance_scale != 1.0 else None
        x1 = self.noise[local].to(device)
        with torch.no_grad(), self.model.use_adapter(policy), self.accelerator.autocast():
            if policy == "reference":
                velocity = policy_velocity(self.model, cond, s.guidance_scale, uncond, forward=self.forward)
                x0, ratio = sample(velocity, x1, self.sigmas.to(device), "ode"), torch.ones(len(local))
            else:
                x0, ratio = traced_sample(self.model, cond, x1, self.sigmas.to(device), forward=self.forward,
                                          guidance_scale=s.guidance_scale, uncond=uncond,
                                          rescale_to_reference=s.rescale_to_reference, rescale_phi=s.rescale_phi)
            images = self.model.decode(x0)
            rewards = self.reward(images, prompts).float().cpu()
        return list(zip(local, to_uint8(images), rewards.tolist(), ratio.tolist()))

    def _gather(self, part: list) -> list:
        if self.accelerator.num_processes == 1:
            return part
        from accelerate.utils import gather_object

        return gather_object(part)

    def __call__(self, step: int, policy_name: str | None = None) -> Path | None:
        """Samples, renders and logs the grid of `step`; returns its path on the main process (None elsewhere)."""
        if self._reference is None:
            self._reference = self._gather(self._sample("reference"))
        current = self._gather(self._sample("default"))
        if not self.accelerator.is_main_process:
            return None

        def cells(found):
            by_index = {j: Cell(img, r, q) for j, img, r, q in found}
            return [by_index[j] for j in range(len(self.prompts))]

        rows = [("reference", cells(self._reference)), (policy_name or f"policy step {step}", cells(current))]
        title = f"{self.title}  step {step}" if self.title else f"step {step}"
        grid = render_grid(rows, self.prompts, title)
        path = save_png(grid, self.out_dir / f"step-{step:06d}.png")
        self.paths[step] = path
        from training.tracking import log_images

        log_images(self.accelerator.trackers, {"samples": grid}, step)
        return path


def head(trace, max_prompts: int = 8) -> SimpleNamespace:
    """The first sample of `max_prompts` distinct prompts of a trace, spread over them (`spread`): prompts,
    images [N, 3, H, W] in [0, 1] on the CPU, ratio [N, K]. What a grid shows, without keeping every image."""
    first: dict[str, int] = {}
    for i, p in enumerate(trace.prompts):
        first.setdefault(p, i)
    distinct = list(first)
    order = [first[distinct[k]] for k in spread(distinct, max_prompts)]
    return SimpleNamespace(prompts=[trace.prompts[i] for i in order], images=trace.images[order].float().cpu(),
                           ratio=trace.ratio[order].float().cpu())


def trace_grid(traces: list[tuple[str, object]], reward, path: str | Path, title: str = "",
               max_prompts: int = 8) -> Path:
    """A grid from already-sampled traces (training.analysis: plain, few-step, renormalised sampling), one row
    per (name, trace); a trace has .prompts, .images [N, 3, H, W] in [0, 1] and .ratio [N, K]. The first
    sample of each of the first `max_prompts` distinct prompts is shown."""
    rows, prompts = [], None
    for name, trace in traces:
        shown = head(trace, max_prompts)
        if prompts is not None and shown.prompts != prompts:
            raise ValueError(f"trace_grid: row {name!r} has other prompts than the first row")
        prompts = shown.prompts
        rewards = reward(shown.images, prompts).float().cpu().tolist()
        ratio = shown.ratio.mean(1).tolist()
        rows.append((name, [Cell(img, r, q) for img, r, q in zip(to_uint8(shown.images), rewards, ratio)]))
    return save_png(render_grid(rows, prompts, title), path)


__all__ = ["Cell", "EvalGrid", "head", "render_grid", "save_png", "spread", "to_uint8", "trace_grid", "traced_sample"]
