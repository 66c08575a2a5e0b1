"""Bad input: NaN / inf rewards during a run (dropped from the advantages, counted, printed; an all-non-finite
step is skipped; never NaN in the weights), and the set-up checks that name the file or key at fault (reward
output contract, empty or missing prompt file, a model folder without a transformer), one line each from the
CLI with exit code 2."""

from __future__ import annotations

import json
import math

import pytest
import torch

from training.__main__ import main
from training.guards import check_model_folder, check_prompt_file, check_reward_output, finite_items
from training.loop import Trainer, group_advantages
from training.methods.base import Item
from training.tracking import read_csv


class _Plain:
    """make_items of the one-slot methods (NFT, AWM): one item per slot with its advantage."""

    def make_items(self, rewards, advantages, prompt_ids):
        return [Item((i,), float(a)) for i, a in enumerate(advantages.tolist())]


def test_non_finite_rewards_leave_the_advantage_computation():
    rewards = torch.tensor([1.0, float("nan"), 3.0, 5.0, float("inf"), 9.0, -float("inf"), 2.0])
    prompt_ids = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
    items, dropped = finite_items(_Plain(), rewards, prompt_ids, group_advantages, "group")
    assert dropped == 3
    assert [it.slots for it in items] == [(0,), (2,), (3,), (5,), (7,)]  # the full rollout's slot numbers
    keep = torch.tensor([0, 2, 3, 5, 7])
    expected = group_advantages(rewards[keep], prompt_ids[keep], "group")
    assert [it.advantage for it in items] == pytest.approx(expected.tolist())
    assert all(math.isfinite(it.advantage) for it in items)
    assert items[-1].advantage == 0.0  # prompt 2 has one finite reward: nothing to compare it with
    none, dropped = finite_items(_Plain(), torch.full((4,), float("nan")), torch.zeros(4, dtype=torch.long),
                                 group_advantages, "global")
    assert none is None and dropped == 4


def test_dpo_pairs_skip_non_finite_images(toy_cfg):
    from training.methods import build_method

    dpo = build_method(toy_cfg("method.name=dpo"))
    rewards = torch.tensor([float("nan"), 0.2, 0.9, 0.5, float("inf"), 0.1])
    items, dropped = finite_items(dpo, rewards, torch.tensor([0, 0, 0, 1, 1, 1]), group_advantages, "global")
    assert dropped == 2 and sorted(it.slots for it in items) == [(2, 1), (3, 5)]


def _poisoned_reward(monkeypatch, poison):
    """Wraps the toy reward so that `poison(step_index, scores)` may overwrite scores of each rollout call."""
    import training.loop as loop

    real = loop.build_reward
    calls = {"n": 0}

    def build(name, **kwargs):
        reward = real(name, **kwargs)

        def scored(images, prompts):
            out = reward(images, prompts).clone()
            calls["n"] += 1
            return poison(calls["n"], out)

        return scored

    monkeypatch.setattr(loop, "build_reward", build)


def test_a_run_with_some_nan_rewards_trains_on_the_rest(toy_cfg, monkeypatch, capsys):
    def poison(call, out):
        out[::3] = float("nan")  # a third of every batch (the set-up check, rollouts, evaluations)
        out[1::7] = float("inf")
        return out

    _poisoned_reward(monkeypatch, poison)
    cfg = toy_cfg("train.steps=2")
    trainer = Trainer(cfg)
    before = {n: p.detach().clone() for n, p in trainer.model.named_trainable_parameters()}
    trainer.run()
    rows = read_csv(cfg.run_dir / "metrics.csv")
    n = 12  # 3 prompts x 4 images per step
    expected = len(set(range(0, n, 3)) | set(range(1, n, 7)))
    assert [r["nonfinite_rewards"] for r in rows] == [expected, expected]
    for r in rows:
        assert math.isfinite(r["loss"]) and math.isfinite(r["reward_mean"]) and r["skipped_updates"] == 0
    out = capsys.readouterr()
    assert f"step 1: {expected} of {n} rewards are NaN or inf; those images leave the advantage computation" in \
        out.out + out.err
    after = dict(trainer.model.named_trainable_parameters())
    assert all(torch.isfinite(p).all() for p in after.values())
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it trained


def test_a_step_whose_every_reward_is_nan_is_skipped(toy_cfg, monkeypatch, capsys):
    poisoned = {"on": False}
    _poisoned_reward(monkeypatch, lambda call, out: out.fill_(float("nan")) if poisoned["on"] else out)
    cfg = toy_cfg("train.steps=3", "log.checkpoint_every=0")
    trainer = Trainer(cfg)
    seen = {}
    original_train_on, original_rollout = trainer.train_on, trainer.rollout

    def train_spy(items, latents, slot_prompts, step):
        seen[step] = True
        return original_train_on(items, latents, slot_prompts, step)

    def rollout_spy(step):  # every reward of step 2's rollout is NaN
        poisoned["on"] = step == 2
        try:
            return original_rollout(step)
        finally:
            poisoned["on"] = False

    trainer.train_on, trainer.rollout = train_spy, rollout_spy
    trainer.run()
    assert sorted(seen) == [1, 3]  # step 2 never trained
    rows = read_csv(cfg.run_dir / "metrics.csv")
    assert [r["nonfinite_rewards"] for r in rows] == [0, 12, 0]
    assert rows[1]["skipped_updates"] == 1 and math.isnan(rows[1]["loss"]) and math.isnan(rows[1]["reward_mean"])
    assert math.isfinite(rows[2]["loss"])
    out = capsys.readouterr()
    assert "step 2: skipped, every one of its 12 rewards is NaN or inf" in out.out + out.err
    assert all(torch.isfinite(p).all() for _, p in trainer.model.named_trainable_parameters())


@pytest.mark.parametrize("bad, message", [
    (lambda out: out[:, None], r"returned shape \(2, 1\) for 2 images; it must return one score per image"),
    (lambda out: out[:1], r"returned shape \(1,\) for 2 images"),
    (lambda out: (out * 100).long(), r"returned dtype torch.int64; it must return floating-point scores"),
    (lambda out: out.tolist(), r"returned list, not a tensor"),
])
def test_a_reward_breaking_its_contract_is_refused_before_training(toy_cfg, monkeypatch, bad, message):
    _poisoned_reward(monkeypatch, lambda call, out: bad(out))
    with pytest.raises(ValueError, match="reward 'caption_match' " + message):
        Trainer(toy_cfg())


def test_check_reward_output_accepts_float_scores():
    out = torch.rand(3, dtype=torch.float16)
    assert check_reward_output(out, 3, "r") is out


def test_prompt_file_errors_name_the_file(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n   \n")
    with pytest.raises(ValueError, match=f"rollout.prompt_file '{empty}' is empty"):
        check_prompt_file(str(empty))
    binary = tmp_path / "prompts.bin"
    binary.write_bytes(b"\xff\xfe\x00\x80")
    with pytest.raises(ValueError, match="cannot be read as text"):
        check_prompt_file(str(binary))
    assert main([f"log.output_dir={tmp_path / 'runs'}", f"rollout.prompt_file={empty}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(empty) in err and "is empty" in err
    assert main([f"log.output_dir={tmp_path / 'runs'}", f"rollout.prompt_file={tmp_path / 'none.txt'}"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main([f"log.output_dir={tmp_path / 'runs'}", f"rollout.prompt_file={empty}", "--dry-run"]) == 2
    assert not (tmp_path / "runs").exists()


def test_a_model_folder_without_a_transformer_is_named(tmp_path, capsys):
    folder = tmp_path / "sd3"
    folder.mkdir()
    index = {"_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"],
             "vae": ["diffusers", "AutoencoderKL"], "text_encoder_3": [None, None]}
    (folder / "model_index.json").write_text(json.dumps(index))
    (folder / "vae").mkdir()
    with pytest.raises(ValueError, match="has no transformer/ folder"):
        check_model_folder("sd3", str(folder))
    (folder / "transformer").mkdir()
    with pytest.raises(ValueError, match=r"transformer/config.json is missing"):
        check_model_folder("sd3", str(folder))
    (folder / "transformer" / "config.json").write_text("{}")
    check_model_folder("sd3", str(folder))  # the optional [null, null] component is not required
    del index["transformer"]
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="lists no transformer component"):
        check_model_folder("sd3", str(folder))
    (folder / "model_index.json").write_text("{not json")
    with pytest.raises(ValueError, match="model_index.json: not valid JSON"):
        check_model_folder("sd3", str(folder))
    (folder / "model_index.json").unlink()
    code = main([f"log.output_dir={tmp_path / 'runs'}", "model.type=sd3", f"model.path={folder}",
                 "rollout.prompts=[a cat]"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "has no model_index.json" in err and str(folder) in err
