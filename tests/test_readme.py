"""The README opens with the two commands a newcomer runs; CI runs exactly the test one."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands():
    lines = ROOT.joinpath("README.md").read_text().splitlines()
    start = lines.index("```bash") + 1
    return [line.split("#")[0].strip() for line in lines[start:start + 2]]


def test_ci_runs_the_readme_test_command():
    main_cmd, test_cmd = _readme_commands()
    assert main_cmd == "bash scripts/setup.sh && python -m training"
    ci = [line.strip() for line in ROOT.joinpath(".ci/run").read_text().splitlines()]
    assert test_cmd in ci
