"""Every command a user is shown is run here: the ```bash blocks of README.md and training/README.md, and the
examples of `python -m training --help`.

How each is covered (COVERAGE below; a documented command that no rule covers fails
`test_every_documented_command_is_covered`):
- `python -m training ...` on the toy: RUN for real, as written, with the schedule shrunk by overrides placed
  before the command's own arguments (1 RL step, 120 pretraining steps cached once per module, 2 eval prompts).
  A step count the command sets itself (`--resume train.steps=60`) is capped at 2; a `--resume` command first gets
  the run it resumes (the same command without --resume, 1 step). Exception, to keep CI short: a command that
  only changes method / NormGuard settings and the run name (`method.name=awm ...`) is a DRY-RUN; every method
  trains in tests/training/test_loop.py::test_each_method_runs_and_logs. `ngk-train ...` (the console script,
  "same arguments") is a DRY-RUN of the installed script.
- Commands that cannot run here, a CUDA launch or real SD3.5 / PickScore weights: DRY-RUN (`--dry-run`: parse,
  config resolution, tracker packages, prompt file, checkpoint to resume), with the placeholder prompt file
  replaced by a real one; their accelerate config file must exist and name the documented engine.
- `accelerate launch --num_processes 2 --cpu -m training`: DRY-RUN through the real launcher (2 processes, gloo);
  the full 2-process run is tests/training/test_loop.py::test_two_processes_match_one.
- `bash scripts/setup.sh`, `python -m pytest`: what CI runs (.ci/run), checked below.
- cmake/ctest: tests/native/test_cmake.py; the benchmark suite: tests/benchmarks/test_benchmarks_smoke.py (smoke
  shapes); `bash benchmarks/run_gpu.sh` needs a CUDA machine: syntax-checked here (`bash -n`).
"""

from __future__ import annotations

import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
READMES = [ROOT / "README.md", ROOT / "training" / "README.md"]


def _readme_commands():
    lines = ROOT.joinpath("README.md").read_text().splitlines()
    start = lines.index("```bash") + 1
    return [line.split("#")[0].strip() for line in lines[start:start + 2]]


def test_ci_runs_the_readme_test_command():
    main_cmd, test_cmd = _readme_commands()
    assert main_cmd == "bash scripts/setup.sh && python -m training"
    ci = [line.strip() for line in ROOT.joinpath(".ci/run").read_text().splitlines()]
    assert test_cmd in ci


# ---------------------------------------------------------------------------------------------------------------
# The documented commands

def bash_blocks(path: Path) -> list[str]:
    """The commands of a file's ```bash blocks: continuation lines joined, comments dropped, `a && b` split."""
    out, inside, pending = [], False, ""
    for line in path.read_text().splitlines():
        if line.strip().startswith("```"):
            inside = line.strip() == "```bash" and not inside
            continue
        if not inside:
            continue
        code = line.split(" #")[0].rstrip() if not line.lstrip().startswith("#") else ""
        if code.endswith("\\"):
            pending += code[:-1].strip() + " "
            continue
        code = (pending + code.strip()).strip()
        pending = ""
        out += [part.strip() for part in code.split("&&") if part.strip()]
    return out


def help_examples() -> list[str]:
    from training.__main__ import EXAMPLES

    return list(EXAMPLES)


def documented_commands() -> list[str]:
    seen = []
    for cmd in [c for path in READMES for c in bash_blocks(path)] + help_examples():
        if cmd not in seen:
            seen.append(cmd)
    return seen


# rule name -> regex; the first match decides how a command is covered
COVERAGE = [
    ("ci", r"^(bash scripts/setup\.sh|python -m pytest)$"),
    ("native", r"^(cmake|ctest) "),
    ("benchmarks", r"^python -m pytest benchmarks "),
    ("gpu_script", r"^bash benchmarks/run_gpu\.sh$"),
    ("accelerate_gpu", r"^accelerate launch --config_file training/configs/accelerate/(multi_gpu|fsdp|deepspeed)"),
    ("accelerate_cpu", r"^accelerate launch .*--cpu -m training"),
    ("real_model", r"^python -m training .*(--config (training/configs/)?(sd35m|flux)|model\.path=)"),
    ("toy", r"^(python -m training|ngk-train)( |$)"),
]


def rule(cmd: str) -> str | None:
    return next((name for name, rx in COVERAGE if re.search(rx, cmd)), None)


def test_every_documented_command_is_covered():
    commands = documented_commands()
    assert len(commands) >= 12, commands
    uncovered = [c for c in commands if rule(c) is None]
    assert not uncovered, f"documented commands no test runs: {uncovered}"
    # every repository file a command names exists
    for cmd in commands:
        for token in shlex.split(cmd):
            value = token.split("=", 1)[-1]
            if re.match(r"^(training|benchmarks|scripts)/\S+\.(ya?ml|sh|py)$", value):
                assert (ROOT / value).is_file(), (cmd, value)


def test_the_covering_tests_exist():
    assert "bash scripts/setup.sh && python -m pytest" in ROOT.joinpath(".ci/run").read_text()
    assert "ctest" in ROOT.joinpath("tests/native/test_cmake.py").read_text()
    assert "benchmarks" in ROOT.joinpath("tests/benchmarks/test_benchmarks_smoke.py").read_text()
    assert "def test_two_processes_match_one" in ROOT.joinpath("tests/training/test_loop.py").read_text()
    assert subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "run_gpu.sh")]).returncode == 0


def test_help_shows_the_examples_and_only_files_that_exist():
    result = _run([sys.executable, "-m", "training", "--help"], timeout=120)
    assert result.returncode == 0, result.stderr
    for example in help_examples():
        assert f"\n  {example}\n" in result.stdout
    for name in re.findall(r"--config ([\w./-]+)", result.stdout.split("examples:")[1]):
        from training.config import load_config

        load_config(name, ["rollout.prompts=[a cat]", "model.path=/unused"])  # the named config resolves


# ---------------------------------------------------------------------------------------------------------------
# Running them

def _run(cmd: list[str], timeout: int = 300, env_extra=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
           "WANDB_SILENT": "true", **(env_extra or {})}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def toy_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("readme_toy_cache")


def _fast(out: Path, cache: Path) -> list[str]:
    return [f"log.output_dir={out}", f"model.toy.cache_dir={cache}", "model.toy.pretrain_steps=120",
            "rollout.prompts_per_step=2", "rollout.group_size=4", "sampling.num_steps=4", "train.steps=1",
            "train.batch_size=8", "eval.num_prompts=2", "eval.samples_per_prompt=1", "eval.every=0",
            "eval.grid_prompts=2", "log.progress=false", "log.checkpoint_every=1"]


def _capped(args: list[str]) -> list[str]:
    return [f"train.steps={min(int(a.split('=')[1]), 2)}" if a.startswith("train.steps=") else a for a in args]


def _training_args(cmd: str) -> list[str]:
    tokens = shlex.split(cmd)
    if tokens[:3] == ["python", "-m", "training"]:
        return tokens[3:]
    if tokens[0] == "ngk-train":  # "ngk-train ...": the console script, same arguments: checked with a dry run
        return [t for t in tokens[1:] if t != "..."] + (["--dry-run"] if "..." in tokens else [])
    i = tokens.index("-m")
    return tokens[i + 2:]


TOY = [c for c in documented_commands() if rule(c) == "toy"]


@pytest.mark.parametrize("cmd", TOY)
def test_toy_command_runs(cmd, tmp_path, toy_cache):
    args = _capped(_training_args(cmd))
    if cmd.startswith("ngk-train"):
        exe = shutil.which("ngk-train")
        assert exe, "the console script ngk-train is not installed (pip install -e .)"
        launcher = [exe]
    else:
        launcher = [sys.executable, "-m", "training"]
    fast = _fast(tmp_path, toy_cache)
    if args and all(re.match(r"^(method|normguard)\.[\w.]+=|^log\.run_name=", a) for a in args):
        args = [*args, "--dry-run"]  # method variants: trained in-process by test_loop (see the docstring)
    if "--resume" in args:  # the run it continues, then the command itself
        first = _run(launcher + fast + [a for a in args if a != "--resume" and not a.startswith("train.steps=")])
        assert first.returncode == 0, first.stderr[-3000:]
    result = _run(launcher + fast + args, timeout=600)
    if "wandb" in cmd and importlib.util.find_spec("wandb") is None:  # an optional extra: the documented error
        assert result.returncode == 2 and "pip install wandb" in result.stderr, result.stderr[-3000:]
        return
    assert result.returncode == 0, f"{cmd}\n{result.stderr[-3000:]}"
    if "--print-config" in args or "--dry-run" in args or "--help" in args:
        assert result.stdout.strip()
        return
    assert "=== summary ===" in result.stdout and "sample grids" in result.stdout, result.stdout
    run_name = next((a.split("=", 1)[1] for a in args if a.startswith("log.run_name=")), "toy_nft")
    run_dir = tmp_path / run_name
    from training.tracking import read_csv

    steps = [int(r["step"]) for r in read_csv(run_dir / "metrics.csv")]
    expected = next((int(a.split("=")[1]) for a in args if a.startswith("train.steps=")), 1)
    assert steps == list(range(1, expected + 1))
    assert (run_dir / "samples" / f"step-{expected:06d}.png").is_file()
    if "wandb" in cmd:
        assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))


def test_two_process_cpu_launch_resolves(tmp_path):
    (cmd,) = [c for c in documented_commands() if rule(c) == "accelerate_cpu"]
    tokens = shlex.split(cmd)
    launcher = [sys.executable, "-m", "accelerate.commands.launch", *tokens[2:tokens.index("-m")]]
    result = _run(launcher + ["-m", "training", f"log.output_dir={tmp_path}", *_training_args(cmd), "--dry-run"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "dry run: config OK" in result.stdout


@pytest.mark.parametrize("cmd", [c for c in documented_commands() if rule(c) in ("accelerate_gpu", "real_model")])
def test_real_model_command_resolves(cmd, tmp_path):
    import yaml

    tokens = shlex.split(cmd)
    if tokens[0] == "accelerate":
        config_file = tokens[tokens.index("--config_file") + 1]
        engine = yaml.safe_load((ROOT / config_file).read_text())["distributed_type"]
        assert engine in ("MULTI_GPU", "FSDP", "DEEPSPEED")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\na red bicycle\n")
    args = [f"rollout.prompt_file={prompts}" if a.startswith("rollout.prompt_file=") else a
            for a in _training_args(cmd) if a != "--dry-run"]
    result = _run([sys.executable, "-m", "training", f"log.output_dir={tmp_path}", *args, "--dry-run"], timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "dry run: config OK" in result.stdout and "sd3 model" in result.stdout
