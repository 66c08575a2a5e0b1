"""The command line as a new user meets it: `--resume key=value` is an override, not a checkpoint; every user
error is one line on stderr with exit code 2 and no traceback; YAML 1.1's yes/no booleans never reach a
string-typed key. (tests/test_readme.py runs the documented commands themselves.)"""

from __future__ import annotations

import pytest

from training.__main__ import main, parse_args
from training.config import load_config


@pytest.mark.parametrize("argv, resume, overrides", [
    (["--resume", "train.steps=60"], True, ["train.steps=60"]),
    (["--resume=train.steps=60"], True, ["train.steps=60"]),
    (["a.b=1", "--resume", "train.steps=60", "c.d=2"], True, ["a.b=1", "train.steps=60", "c.d=2"]),
    (["--resume"], True, []),
    (["--resume", "outputs/run/checkpoints/step-4"], "outputs/run/checkpoints/step-4", []),
    (["--resume", "outputs/run/checkpoints/step-4", "train.steps=60"], "outputs/run/checkpoints/step-4",
     ["train.steps=60"]),
    (["train.steps=60"], False, ["train.steps=60"]),
    (["a.b=1", "--config", "toy.yaml", "c.d=2", "--resume"], True, ["a.b=1", "c.d=2"]),  # options between overrides
])
def test_resume_takes_a_checkpoint_folder_never_an_override(argv, resume, overrides):
    args = parse_args(argv)
    assert args.resume == resume and args.overrides == overrides


def test_a_checkpoint_path_containing_equals_that_exists_stays_a_checkpoint(tmp_path):
    odd = tmp_path / "lr=3e-4" / "step-2"
    odd.mkdir(parents=True)
    assert parse_args(["--resume", str(odd)]).resume == str(odd)


def _one_line_error(capsys, argv, expected):
    code = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert expected in lines[0], lines[0]
    return lines[0]


def test_user_errors_are_one_line_with_exit_code_2(capsys, tmp_path):
    out = [f"log.output_dir={tmp_path}"]
    _one_line_error(capsys, ["--no-such-flag"], "unrecognized arguments: --no-such-flag")
    _one_line_error(capsys, ["train.steps"], "must look like key=value")
    _one_line_error(capsys, ["train.stepz=3"], "config error: unknown config key 'train.stepz'; did you mean 'steps'")
    _one_line_error(capsys, ["train.steps=many"], "'train.steps' must be an integer, got 'many'")
    _one_line_error(capsys, ["--config", "no_such.yaml"], "config file 'no_such.yaml' not found")
    _one_line_error(capsys, ["log.trackers=[csv,mlflow]"], "unknown tracker(s) ['mlflow']")
    _one_line_error(capsys, [*out, "rollout.prompt_file=/no/such/prompts.txt"], "/no/such/prompts.txt")
    # --resume with nothing to resume: one line, naming the folder it looked in, even after `--resume key=value`
    line = _one_line_error(capsys, [*out, "--resume", "train.steps=60", "--dry-run"], "no checkpoint found")
    assert str(tmp_path / "toy_nft" / "checkpoints") in line
    _one_line_error(capsys, [*out, "--resume", "train.steps=60"], "no checkpoint found")
    assert not (tmp_path / "toy_nft" / "checkpoints").exists()  # nothing was trained


def test_dry_run_resolves_the_config_and_says_what_it_would_do(capsys, tmp_path):
    assert main([f"log.output_dir={tmp_path}", "method.name=awm", "train.steps=7", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "dry run: config OK; fresh run; toy model, method awm, 7 steps, 16 prompts" in out
    assert str(tmp_path / "toy_nft") in out
    assert not any(tmp_path.iterdir())  # a dry run writes nothing


@pytest.mark.parametrize("text", ["no", "fp16", "bf16"])
def test_string_keys_take_the_text_as_given(text):
    assert load_config(overrides=[f"train.mixed_precision={text}"]).train.mixed_precision == text


def test_yaml_files_read_no_as_a_string_and_only_true_false_as_booleans(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  mixed_precision: no\nmodel:\n  free_text_encoders: true\n")
    cfg = load_config(path)
    assert cfg.train.mixed_precision == "no" and cfg.model.free_text_encoders is True
    path.write_text("model:\n  free_text_encoders: yes\n")
    with pytest.raises(ValueError, match="'model.free_text_encoders' must be true or false, got 'yes'"):
        load_config(path)


def test_overrides_of_string_keys_are_never_reinterpreted():
    cfg = load_config(overrides=["log.run_name=1e-4", "rollout.prompts=[a cat, no, 3]", "train.lr=1e-4",
                                 "log.trackers=[csv, tensorboard]"])
    assert cfg.log.run_name == "1e-4"  # not the float 0.0001
    assert cfg.rollout.prompts == ["a cat", "no", "3"]  # strings, not False and 3
    assert cfg.train.lr == pytest.approx(1e-4) and cfg.log.trackers == ["csv", "tensorboard"]
