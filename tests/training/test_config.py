"""Config: defaults, YAML files, dotted overrides, and clear errors before any work."""

from __future__ import annotations

import pytest

from tests.training.conftest import run_cli
from training.config import CONFIG_DIR, Config, apply_override, load_config


def test_default_config_is_the_embedded_toy_nft_normguard_run():
    cfg = load_config()
    assert cfg.model.type == "toy" and cfg.method.name == "nft" and cfg.normguard.ng_lambda > 0
    assert cfg.reward.name == "caption_match"


def test_overrides_read_yaml_values_and_check_types():
    cfg = load_config(overrides=["train.lr=1e-4", "normguard.per_token=true", "method.name=dpo",
                                 "finetune.target_modules=[to_q, to_k]", "reward.kwargs.width=0.3",
                                 "method.dpo.ref_update_every=5"])
    assert cfg.train.lr == pytest.approx(1e-4) and isinstance(cfg.train.lr, float)
    assert cfg.normguard.per_token is True
    assert cfg.finetune.target_modules == ["to_q", "to_k"]
    assert cfg.reward.kwargs == {"width": 0.3}
    assert cfg.method.dpo.ref_update_every == 5


@pytest.mark.parametrize("override, message", [
    ("train.stepz=3", "unknown config key 'train.stepz'; did you mean 'steps'"),
    ("trian.steps=3", "unknown config key 'trian'"),
    ("train.steps=ten", "'train.steps' must be an integer"),
    ("train.steps=2.5", "'train.steps' must be an integer"),
    ("train.lr=fast", "'train.lr' must be a number"),
    ("normguard.squared=maybe", "'normguard.squared' must be true or false"),
    ("method.name=ppo", "'method.name' must be one of ['nft', 'awm', 'dpo', 'grpo']"),
    ("sampling.sampler=heun", "'sampling.sampler' must be one of"),
    ("normguard.ng_lambda=-0.1", "'normguard.ng_lambda' must be >= 0"),
    ("rollout.group_size=1", "'rollout.group_size' must be >= 2"),
    ("model.type=unet", "'model.type' must be one of"),
    ("reward.name=vibes", "'reward.name' must be one of"),
    ("train.steps", "must look like key=value"),
    ("train.steps.x=1", "is a value, not a section"),
    ("model.toy.image_size=18", "multiple of model.toy.patch_size"),
])
def test_bad_overrides_are_clear_errors(override, message):
    with pytest.raises(ValueError) as err:
        load_config(overrides=[override])
    assert message in str(err.value)


def test_unknown_key_in_a_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  steps: 3\n  learning_rate: 0.1\n")
    with pytest.raises(ValueError, match="unknown config key 'train.learning_rate'"):
        load_config(path)
    with pytest.raises(ValueError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_every_shipped_config_loads():
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        cfg = load_config(path, ["rollout.prompts=[a photo of a cat]"])
        assert isinstance(cfg, Config), path


def test_apply_override_sets_a_whole_section():
    cfg = Config()
    apply_override(cfg, "normguard={ng_lambda: 0.5, relative: true}")
    assert cfg.normguard.ng_lambda == 0.5 and cfg.normguard.relative


def test_cli_reports_config_errors_before_any_work(tmp_path):
    result = run_cli(["train.stepz=3", f"log.output_dir={tmp_path}"], timeout=120)
    assert result.returncode == 2
    assert "config error: unknown config key 'train.stepz'" in result.stderr
    assert not any(tmp_path.iterdir())  # nothing was created
