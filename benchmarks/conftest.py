"""pytest-benchmark suite options, shared fixtures, and the results files written at the end of the session.

    python -m pytest benchmarks --benchmark-enable --bench-shapes=full     (see benchmarks/README.md)
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import cases, harness, results, timers

RECORDER_KEY = pytest.StashKey[harness.Recorder]()
PATHS_KEY = pytest.StashKey[dict]()


def pytest_addoption(parser):
    group = parser.getgroup("ngkernels benchmarks")
    group.addoption("--bench-shapes", choices=tuple(cases.SHAPE_SETS), default="full",
                    help="shape set: full (issue 4's S, M, T, F, XL) or smoke (one tiny shape, for CI)")
    group.addoption("--bench-device", choices=("auto", "cpu", "cuda"), default="auto",
                    help="device to benchmark on (auto: cuda when available)")
    group.addoption("--bench-results", default=None,
                    help="folder for <device>.csv/.md/.png (default: benchmarks/results for full, "
                         ".benchmarks/smoke for smoke, so smoke runs never touch committed results)")
    group.addoption("--bench-threads", type=int, default=0,
                    help="CPU intra-op threads (default: torch's); recorded in every row")
    group.addoption("--bench-max-time", type=float, default=1.0,
                    help="CPU: seconds of pytest-benchmark rounds per case (at least 5 rounds)")


def pytest_configure(config):
    config.stash[RECORDER_KEY] = harness.Recorder(results_dir(config))
    # pytest-benchmark's rule: --benchmark-enable overrides --benchmark-disable
    if config.getoption("benchmark_disable", False) and not config.getoption("benchmark_enable", False):
        raise pytest.UsageError("the benchmark suite needs --benchmark-enable (pyproject's addopts disables "
                                "pytest-benchmark for the test suite)")


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        selected = cases.cases(metafunc.config.getoption("bench_shapes"))
        metafunc.parametrize("case", selected, ids=[c.id for c in selected])


@pytest.fixture(scope="session")
def bench_device(pytestconfig):
    device = cases.resolve_device(pytestconfig.getoption("bench_device"))
    cases.check_timed_backend(device)
    harness.set_threads(pytestconfig.getoption("bench_threads"))
    return device


@pytest.fixture(scope="session")
def bench_env(bench_device):
    return results.environment(bench_device)


@pytest.fixture(scope="session")
def copy_gbps(bench_device):
    """The physical limit, measured once per run on the benchmarked device."""
    return timers.copy_bandwidth_gbps(bench_device)


@pytest.fixture(scope="session")
def recorder(pytestconfig) -> harness.Recorder:
    """`recorder.add(row)`: one measured row into the run's CSV."""
    return pytestconfig.stash[RECORDER_KEY]


def results_dir(config) -> Path:
    chosen = config.getoption("bench_results")
    return Path(chosen) if chosen else results.default_results_dir(config.getoption("bench_shapes"))


def pytest_sessionfinish(session, exitstatus):
    recorder = session.config.stash.get(RECORDER_KEY, None)
    paths = recorder.finish() if recorder else None
    if paths:
        session.config.stash[PATHS_KEY] = paths


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    paths = config.stash.get(PATHS_KEY, None)
    if paths:
        terminalreporter.write_sep("-", "ngkernels benchmark results")
        for path in paths.values():
            terminalreporter.write_line(str(path))
