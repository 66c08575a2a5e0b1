"""Sample grids: rendering (pixels land where they should, labelled), the along-trajectory norm ratio against a
closed form, the grids a toy run writes (fixed noise, reference row == policy row at step 0), and the images
reaching TensorBoard."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from training.grids import CELL, Cell, render_grid, spread, to_uint8, traced_sample
from training.loop import Trainer
from training.sampling import sigma_schedule


def test_render_grid_upscales_nearest_and_places_every_image():
    """Each 16 px image has its left half in a colour of its own: after 8x nearest upscaling that colour must be
    an exact 128 x 64 block, cells ordered left to right by prompt and top to bottom by row."""
    colours = {(r, c): (40 + 100 * r, 10 + 60 * c, 200 - 30 * c) for r in range(2) for c in range(3)}
    rows = []
    for r in range(2):
        cells = []
        for c in range(3):
            img = np.full((16, 16, 3), 128, np.uint8)
            img[:, :8] = colours[r, c]
            cells.append(Cell(img, reward=0.1 * c, ratio=1.0 + r))
        rows.append((f"row {r}", cells))
    grid = render_grid(rows, ["a red thing", "a green thing", "a blue thing"], title="t")
    assert grid.dtype == np.uint8 and grid.shape[2] == 3
    scale = CELL // 16
    corners = {}
    for key, colour in colours.items():
        ys, xs = np.nonzero((grid == colour).all(-1))
        assert len(ys) == (16 * scale) * (8 * scale), key  # exactly the upscaled half image, nothing else
        assert ys.max() - ys.min() + 1 == 16 * scale and xs.max() - xs.min() + 1 == 8 * scale
        corners[key] = (ys.min(), xs.min())
    for r in range(2):
        assert corners[r, 0][1] < corners[r, 1][1] < corners[r, 2][1]
        assert corners[r, 0][0] == corners[r, 1][0] == corners[r, 2][0]
    assert corners[0, 0][0] < corners[1, 0][0]
    # text was drawn: dark pixels outside the images (title, prompts, row names, reward and ratio labels)
    assert ((grid < 60).all(-1)).sum() > 500


def test_render_grid_refuses_ragged_rows():
    cell = Cell(np.zeros((16, 16, 3), np.uint8), 0.0, 1.0)
    with pytest.raises(ValueError, match="one cell per prompt"):
        render_grid([("a", [cell])], ["p", "q"])


def test_spread_covers_every_colour_shape_and_side_of_the_toy_captions():
    from training.toy.data import CAPTIONS

    chosen = [CAPTIONS[k] for k in spread(list(CAPTIONS), 8)]
    assert len(set(chosen)) == 8
    for word in ("red", "green", "blue", "yellow", "circle", "square", "left", "right"):
        assert any(word in c for c in chosen), (word, chosen)
    assert spread(["a", "b"], 8) == [0, 1]
    for size in range(1, 20):
        for n in range(1, size + 2):
            chosen = spread([str(i) for i in range(size)], n)
            assert len(chosen) == min(n, size) == len(set(chosen)) and all(0 <= k < size for k in chosen)


class _LinearField(torch.nn.Module):
    """v = a * x for the policy and b * x inside reference(): the ratio is a / b at every step of any trajectory,
    and the ODE's result is x1 * prod_k (1 + (s_{k+1} - s_k) a)."""

    def __init__(self, a, b):
        super().__init__()
        self.a, self.b, self.ref = a, b, False

    @contextlib.contextmanager
    def reference(self):
        self.ref = True
        try:
            yield
        finally:
            self.ref = False

    def velocity(self, x, sigma, cond):
        return (self.b if self.ref else self.a) * x


def test_traced_sample_ratio_is_the_policy_over_the_reference_along_the_trajectory():
    model = _LinearField(torch.tensor([1.1, 0.7]).view(2, 1, 1, 1), 0.9)
    x1 = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    sigmas = sigma_schedule(5, 3.0)
    x0, ratio = traced_sample(model, {}, x1, sigmas)
    assert torch.allclose(ratio.double(), torch.tensor([1.1 / 0.9, 0.7 / 0.9], dtype=torch.float64), rtol=1e-5)
    s = sigmas.double().tolist()
    factor = torch.tensor([np.prod([1 + (s[k + 1] - s[k]) * a for k in range(5)]) for a in (1.1, 0.7)])
    assert torch.allclose(x0, x1 * factor.view(2, 1, 1, 1), rtol=1e-5)
    # renormalised sampling uses v * ||v_ref|| / ||v|| = b x, while the ratio stays the raw policy's
    x0r, ratio_r = traced_sample(model, {}, x1, sigmas, rescale_to_reference=True)
    assert torch.allclose(ratio_r, ratio)
    factor_b = np.prod([1 + (s[k + 1] - s[k]) * 0.9 for k in range(5)])
    assert torch.allclose(x0r, x1 * factor_b, rtol=1e-5)


def test_to_uint8_clamps_and_zeroes_non_finite_pixels():
    x = torch.tensor([[[[0.0, 1.0], [2.0, float("nan")]]]]).expand(1, 3, 2, 2)
    out = to_uint8(x)
    assert out.shape == (1, 2, 2, 3) and out[0, 0, 1, 0] == 255 and out[0, 1, 0, 0] == 255 and out[0, 1, 1, 0] == 0


def test_a_run_writes_a_grid_at_every_evaluation_from_fixed_noise(toy_cfg):
    cfg = toy_cfg("train.steps=2", "eval.every=1", "eval.grid_prompts=4", "log.trackers=[csv,tensorboard]")
    trainer = Trainer(cfg)
    # before any update the policy is the reference: same noise -> the very same images, ratio exactly 1
    ref = trainer.grid._sample("reference")
    pol = trainer.grid._sample("default")
    assert [j for j, *_ in ref] == [0, 1, 2, 3]
    for (_, img_r, rew_r, q_r), (_, img_p, rew_p, q_p) in zip(ref, pol):
        assert np.array_equal(img_r, img_p) and rew_r == rew_p and q_r == 1.0 and q_p == pytest.approx(1.0, abs=1e-6)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(ref, trainer.grid._sample("reference")))  # fixed noise
    summary = trainer.run()
    samples = cfg.run_dir / "samples"
    assert sorted(p.name for p in samples.iterdir()) == ["step-000000.png", "step-000001.png", "step-000002.png"]
    assert summary.grids == [samples / "step-000000.png", samples / "step-000002.png"]
    assert any(str(samples / "step-000002.png") in line for line in summary.lines())
    from PIL import Image

    first, last = (np.asarray(Image.open(samples / n)) for n in ("step-000000.png", "step-000002.png"))
    assert first.shape == last.shape and first.shape[0] > 2 * CELL
    # the images reached TensorBoard, one per evaluation, with the step
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(cfg.run_dir / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert "samples" in events.Tags()["images"]
    logged = events.Images("samples")
    assert [e.step for e in logged] == [0, 1, 2]
    assert (logged[-1].width, logged[-1].height) == (last.shape[1], last.shape[0])


def test_grids_can_be_switched_off(toy_cfg):
    cfg = toy_cfg("train.steps=1", "eval.grid_prompts=0")
    summary = Trainer(cfg).run()
    assert summary.grids == [] and not (cfg.run_dir / "samples").exists()


def test_analysis_grids_one_row_per_condition_same_prompts(tmp_path):
    from types import SimpleNamespace

    from training.analysis.evaluate import EvalSettings, write_analysis_grids
    from training.grids import head

    prompts = [p for p in ("a red circle on the left", "a blue square on the right", "a green circle on the left")
               for _ in range(2)]

    def trace(level):
        images = torch.full((6, 3, 16, 16), level)
        images[1::2] = 0.0  # second samples differ: the grid shows each prompt's first sample
        return SimpleNamespace(prompts=prompts, images=images, ratio=torch.full((6, 4), 1.0 + level))

    shown_one = head(trace(0.5), max_prompts=8)
    assert shown_one.prompts == prompts[::2] and (shown_one.images == 0.5).all()
    assert head(trace(0.5), max_prompts=2).prompts == [prompts[0], prompts[4]]  # spread, not the first two
    settings = EvalSettings(prompts=prompts[::2], num_steps=4, few_steps=(2, 4), rescale_phis=(0.5, 1.0))
    shown = {"plain, 2 steps": head(trace(0.2)), "plain, 4 steps": head(trace(0.4)),
             "renorm phi=0.5": head(trace(0.6)), "renorm phi=1": head(trace(0.8))}
    reward = lambda images, ps: images.mean(dim=(1, 2, 3))  # noqa: E731
    paths = write_analysis_grids(shown, settings, reward, tmp_path, title="t")
    assert [p.name for p in paths] == ["grid_plain.png", "grid_few_step.png", "grid_renorm.png"]
    from PIL import Image

    heights = [np.asarray(Image.open(p)).shape[0] for p in paths]
    assert heights[0] < heights[1] < heights[2]  # 1 row (full count), 2 (step counts 2, 4), 3 (plain + 2 phis)
    renorm = np.asarray(Image.open(paths[2]))
    for level in (0.4, 0.6, 0.8):  # the rows: plain (full count), then each phi; uniform grey cells of that level
        count = ((renorm == round(level * 255)).all(-1)).sum()
        assert 3 * CELL * CELL <= count < 3 * CELL * CELL + 500  # three cells (+ a few anti-aliased text pixels)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_sd3_and_flux_grids_are_decoded_by_the_vae(tmp_path, kind):
    from tests.training.tiny_pipelines import save_tiny_flux_pipeline, save_tiny_sd3_pipeline
    from training.config import load_config

    save = save_tiny_sd3_pipeline if kind == "sd3" else save_tiny_flux_pipeline
    path = save(tmp_path / kind)
    cfg = load_config(overrides=[
        f"model.type={kind}", f"model.path={path}", "model.resolution=32", "model.max_sequence_length=8",
        "rollout.prompts=[a red cat, a blue dog, a green tree]", "rollout.prompts_per_step=2", "rollout.group_size=2",
        "sampling.num_steps=2", "reward.name=colorfulness", "method.nft.num_timesteps=1", "train.steps=1",
        "train.batch_size=4", "eval.num_prompts=3", "eval.samples_per_prompt=1", "eval.grid_prompts=3",
        f"log.output_dir={tmp_path}", "log.trackers=[csv]", "log.progress=false"])
    trainer = Trainer(cfg)
    assert trainer.model.latent_shape[-1] < 32  # latents are smaller than the images: the VAE decodes them
    ref = trainer.grid._sample("reference")
    assert [img.shape for _, img, _, _ in ref] == [(32, 32, 3)] * 3
    assert all(img.std() > 0 for _, img, _, _ in ref)  # decoded pictures, not blank cells
    summary = trainer.run()
    assert [p.name for p in summary.grids] == ["step-000000.png", "step-000001.png"]
    from PIL import Image

    grid = np.asarray(Image.open(summary.grids[-1]))
    assert grid.shape[1] > 3 * CELL and grid.shape[0] > 2 * CELL  # 3 prompts x 2 rows of 128 px cells (32 px x 4)
