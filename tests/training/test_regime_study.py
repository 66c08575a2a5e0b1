"""The regime study's plumbing (issue 14): the protocol's stages hold the runs it names, a run's identity ignores
what does not change its training, a finished run is found and not rerun, a shorter one is extended exactly,
and the budget rule picks the smallest step at which every run reaches the threshold."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.training.conftest import toy_overrides
from training.analysis.study.budget import choose_budget
from training.analysis.study.regime import (RunSpec, build_config, parse_form, plan, run_identity, stage_runs,
                                            train_run)
from training.tracking import read_csv


def test_stages_hold_the_protocols_runs():
    sweep = stage_runs("sweep")
    assert len(sweep) == 2 * (1 + 48) and sum(r.off for r in sweep) == 2
    forms = {r.overrides[4:] for r in sweep if not r.off}
    assert len(forms) == 48  # lambda x margin x abs/rel x plain/sq x sample/token
    assert {r.overrides[3] for r in sweep} == {"train.seed=100", "train.seed=101"}
    for stage in ("sd3-off", "sd3-adaptive"):
        runs = stage_runs(stage)
        assert len(runs) == 4 * 2 * 3 and len({r.label for r in runs}) == 24
        assert {r.config_file for r in runs if "grpo" in r.label} == {"toy_grpo.yaml"}
    with pytest.raises(ValueError, match="needs --fixed-form"):
        stage_runs("sd3-fixed")
    fixed = stage_runs("sd3-fixed", parse_form("lambda=0.1,margin=0.02,relative=true,squared=false,per_token=true"))
    assert "normguard.margin=0.02" in fixed[0].overrides and "normguard.per_token=true" in fixed[0].overrides
    with pytest.raises(ValueError, match="--fixed-form must look like"):
        parse_form("lambda=0.1")
    with pytest.raises(ValueError, match="unknown stage"):
        stage_runs("flux-on")
    flux = stage_runs("flux-adaptive")
    assert len(flux) == 24 and {r.overrides[0] for r in flux} == {"model.type=toy_flux"}
    assert flux[0].label.startswith("flux_") and flux[0].overrides[1:] == stage_runs("sd3-adaptive")[0].overrides[1:]


def test_identity_ignores_logging_and_the_step_count(tmp_path):
    spec = stage_runs("sd3-off")[0]
    a, ida = build_config(spec, 100, tmp_path / "a")
    b, idb = build_config(spec, 300, tmp_path / "b")
    assert ida == idb == run_identity(a) and a.run_dir.name == f"{spec.label}-{ida}"
    other, idc = build_config(stage_runs("sd3-adaptive")[0], 100, tmp_path)
    assert idc != ida  # NormGuard settings are part of the identity
    assert a.log.checkpoint_every == 5 and a.log.keep_checkpoints == 21 and other.log.keep_checkpoints == 1


def test_a_shorter_run_is_extended_exactly(tmp_path, toy_cache):
    """train_run to 2 steps, then to 3 (resumed from step 2): the 3-step run's log equals a straight 3-step run's."""
    tiny = [o for o in toy_overrides("unused", toy_cache) if not o.startswith("log.")]
    spec = RunSpec("test", "tiny", "toy.yaml", (*tiny, "normguard.ng_lambda=0"), True, 0)
    cfg2, _ = build_config(spec, 2, tmp_path / "study")
    assert train_run(cfg2.to_dict())["steps"] == 2
    cfg3, _ = build_config(spec, 3, tmp_path / "study")
    assert cfg3.run_dir == cfg2.run_dir
    status = train_run(cfg3.to_dict())
    assert status["steps"] == 3 and status["resumed"]
    straight, _ = build_config(spec, 3, tmp_path / "straight")
    train_run(straight.to_dict())
    a, b = read_csv(cfg3.run_dir / "metrics.csv"), read_csv(straight.run_dir / "metrics.csv")
    assert [r["step"] for r in a] == [1, 2, 3]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert json.loads((cfg3.run_dir / "status.json").read_text())["steps"] == 3


def test_plan_marks_runs_done_by_their_status(tmp_path):
    runs = plan(["sd3-off"], 300, tmp_path)
    assert not any(done for *_, done in runs)
    spec, cfg, ident, _ = runs[0]
    cfg.run_dir.mkdir(parents=True)
    (cfg.run_dir / "status.json").write_text(json.dumps({"steps": 300}))
    done = {s.label: d for s, _, _, d in plan(["sd3-off"], 300, tmp_path)}
    assert done[spec.label] and sum(done.values()) == 1
    assert not plan(["sd3-off"], 400, tmp_path)[0][3]  # a larger budget: to be extended


def test_budget_rule_takes_the_smallest_step_where_every_run_reaches_the_threshold():
    curves = {"a": [{"step": s, "inflation_pct": x} for s, x in [(25, 1.0), (50, 5.2), (75, 4.9), (100, 6.0)]],
              "b": [{"step": s, "inflation_pct": x} for s, x in [(25, 2.0), (50, 4.0), (75, 5.5), (100, 7.0)]]}
    choice = choose_budget(curves, 5.0)
    assert choice["budget"] == 100  # at 50 b is below, at 75 a has fallen below again
    assert choice["per_run"] == {"a": (50, 100), "b": (75, 100)}
    short = {"a": curves["a"], "b": curves["b"][:3]}
    assert choose_budget(short, 5.0)["budget"] is None and choose_budget(short, 5.0)["common_steps"] == [25, 50, 75]
    low = {"a": curves["a"], "c": [{"step": s, "inflation_pct": 1.0} for s in (25, 50, 75, 100)]}
    assert choose_budget(low, 5.0, cap=100)["budget"] == 100 and choose_budget(low, 5.0, cap=100)["capped"]
    assert choose_budget(low, 5.0, cap=200)["budget"] is None  # not measured up to the cap yet
    assert not choose_budget(curves, 5.0, cap=100)["capped"]
    with pytest.raises(ValueError):
        choose_budget({}, 5.0)


def _write_metrics(path, rewards_every_5):
    lines = ["step,eval_reward,norm_ratio"]
    for step in range(1, 5 * len(rewards_every_5) + 1):
        r = rewards_every_5[step // 5 - 1] if step % 5 == 0 else ""
        lines.append(f"{step},{r},1.0")
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.csv").write_text("\n".join(lines) + "\n")


def test_matching_uses_the_evaluated_steps(tmp_path):
    """Evaluations every 5 steps: the off run is taken at an evaluated step (one with a checkpoint), not at the
    index of its evaluation."""
    from training.analysis.study.evaluation import matched_step

    _write_metrics(tmp_path / "off", [0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    _write_metrics(tmp_path / "on", [0.1, 0.2, 0.3, 0.35, 0.35, 0.35])
    m = matched_step(tmp_path / "off", tmp_path / "on")  # off's trailing means: .1 .15 .2 .3 .4 .5; target .35
    assert m["step"] == 25 and m["reached"] and m["target_reward"] == pytest.approx(0.35)
    m = matched_step(tmp_path / "on", tmp_path / "off")  # never reached: the best evaluated step, flagged
    assert m["step"] in (20, 25, 30) and not m["reached"]


def test_evaluation_stage_writes_each_checkpoint_once_and_replays_a_lost_one(tmp_path, toy_cache, monkeypatch):
    """Final checkpoints of an off and an adaptive run, the off run's matched checkpoint, the reference and the
    data floor each get one complete JSON; a second pass finds nothing left to do (the stage resumes). A matched
    checkpoint that is gone is replayed exactly, from step 0 again when a restored replay holds only a later one."""
    from training.analysis.study import evaluation

    monkeypatch.setattr(evaluation, "EVAL", dict(evaluation.EVAL, samples_per_prompt=1, few_steps=(2,),
                                                  rescale_phis=(1.0,), adjoint_samples_per_prompt=1))
    monkeypatch.setattr(evaluation, "FEATURE_STEPS", 20)
    monkeypatch.setattr(evaluation, "NUM_REFERENCE", 64)
    tiny = [o for o in toy_overrides("unused", toy_cache) if not o.startswith(("log.", "eval."))]
    specs = [RunSpec("sd3-off", "sd3_nft_caption_match_off_s0", "toy.yaml", (*tiny, "normguard.ng_lambda=0"), True, 0),
             RunSpec("sd3-adaptive", "sd3_nft_caption_match_adaptive_s0", "toy.yaml",
                     (*tiny, "normguard.adaptive=true"), False, 0)]
    finished = []
    for spec in specs:
        cfg, _ = build_config(spec, 10, tmp_path / "study")
        train_run(cfg.to_dict())
        finished.append((spec, cfg))
    jobs = evaluation.evaluation_jobs(finished, tmp_path / "study")
    names = sorted(str(p).replace(str(tmp_path / "study"), "") for _, _, p in jobs)
    matched = evaluation.matched_step(finished[0][1].run_dir, finished[1][1].run_dir)["step"]
    assert matched in (5, 10)
    assert len(jobs) == 4 + (matched == 5), names  # data, reference, 2 finals (+ the matched one if not final)
    for fn, args, path in jobs:
        result = fn(*args)
        stored = json.loads(open(path).read())
        assert stored["label"] == result["label"]
        if fn is evaluation.evaluate_to_file:
            assert {r["sampling"] for r in stored["rows"]} == {"plain", "renorm"}
            assert {"reward_mean", "fd", "attribute_acc", "pixel_mmd", "norm_inflation_pct"} <= set(stored["rows"][0])
            assert len(stored["samples"]["images"]) == len(stored["samples"]["prompts"]) > 0
    assert evaluation.evaluation_jobs(finished, tmp_path / "study") == []

    # A study restored on a fresh machine has the off run's results but not its checkpoints (archive.py): the
    # matched evaluation is listed as missing, and --replay trains the off run again up to the matched step. On
    # this machine the replay is the run itself, so its logged curve and its evaluation are the original's exactly.
    off_dir, matched_json = finished[0][1].run_dir, evaluation.eval_path(finished[0][1].run_dir, matched)
    original = json.loads(matched_json.read_text())
    shutil.rmtree(off_dir / "checkpoints")
    matched_json.unlink()
    missing = []
    assert evaluation.evaluation_jobs(finished, tmp_path / "study", missing=missing) == []
    assert missing == [str(matched_json)]
    (job,) = evaluation.evaluation_jobs(finished, tmp_path / "study", replay=True)
    assert job[0] is evaluation.replay_and_evaluate and job[2] == str(matched_json)
    job[0](*job[1])
    replayed = json.loads(matched_json.read_text())
    assert replayed["replay"] == {"steps_compared": matched, "max_abs_eval_reward_diff": 0.0,
                                  "max_abs_norm_ratio_diff": 0.0, "replayed_to": matched}
    assert replayed["rows"] == original["rows"]
    assert evaluation.evaluation_jobs(finished, tmp_path / "study", replay=True) == []

    # The replay restored from its archive keeps its latest checkpoint only; here that one lies past the wanted step
    # (as when an on run of the same cell, matched later, made the replay go further). The replay is trained again
    # from step 0 rather than evaluating a checkpoint that is not there, and repeats the run exactly once more.
    replay = evaluation.replay_dir(off_dir)
    for folder in (replay / "checkpoints").glob("step-*"):
        shutil.rmtree(folder) if folder.name != f"step-{matched}" else folder.rename(folder.with_name("step-15"))
    matched_json.unlink()
    (job,) = evaluation.evaluation_jobs(finished, tmp_path / "study", replay=True)
    job[0](*job[1])
    assert json.loads(matched_json.read_text())["rows"] == original["rows"]
    assert sorted(f.name for f in (replay / "checkpoints").glob("step-*")) == sorted({"step-5", f"step-{matched}"})


def test_a_run_has_one_writer(tmp_path):
    """A second process training the same run directory (e.g. a rerun while a killed driver's workers still train)
    fails at once instead of appending to the same run."""
    from training.analysis.study.jobs import exclusive

    with exclusive(tmp_path / "run"):
        with pytest.raises(RuntimeError, match="being trained by another process"):
            with exclusive(tmp_path / "run"):
                pass
    with exclusive(tmp_path / "run"):  # released when its holder ends
        pass
