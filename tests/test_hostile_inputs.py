"""The hostile-input script (benchmarks/hostile_inputs.py): its classifier, and two of its cases run for real."""

import importlib.util
import sys
from pathlib import Path

import pytest

_path = Path(__file__).resolve().parents[1] / "benchmarks" / "hostile_inputs.py"
_spec = importlib.util.spec_from_file_location("hostile_inputs", _path)
H = importlib.util.module_from_spec(_spec)
sys.modules["hostile_inputs"] = H
_spec.loader.exec_module(H)

ERR = H.Case("e", "0", lambda tmp: [], "error", ("bad.toml", "seeds"))
REC = H.Case("r", "0", lambda tmp: [], "go on", ("bomb.png",))
FIRST = H.Case("f", "0", lambda tmp: [], "error", ("strip", "clean set"), absent=("--download",), before_work=True)
PIPE = H.Case("p", "0", lambda tmp: [], "go on", ("badnets",), absent=("…",))


@pytest.mark.parametrize("case,rc,output,problem,kind", [
    (ERR, 2, "error: bad.toml: invalid config\n  seeds.0: Input should be a valid integer", None, "clear error"),
    (ERR, 1, "Traceback (most recent call last):\n  ...\nKeyError: 'seeds'\n", None, "traceback"),
    (ERR, 0, "plan: 3 runs", None, "silent"),
    (ERR, 2, "error: invalid config", None, "misleading"),  # names neither the file nor the field
    (ERR, 2, "error: bad.toml: seeds " + "x" * 5000, None, "misleading"),  # a wall of text
    (ERR, 1, "numpy._core._exceptions._ArrayMemoryError: Unable to allocate", None, "memory"),
    (REC, 0, "UserWarning: imgs: skipped 1 unreadable image(s): a/bomb.png", None, "handled"),
    (REC, 0, "UserWarning: imgs: skipped 1 unreadable image(s): a/bomb.png", "runs failed: ['x']", "silent"),
    (REC, 0, "done", None, "silent"),  # went on without saying what it skipped
    (REC, 2, "error: bomb.png: DecompressionBombError", None, "misleading"),  # stopped where it should go on
])
def test_classify(case, rc, output, problem, kind):
    assert H.classify(case, rc, output, problem)[0] == kind


@pytest.mark.parametrize("case,rc,output,worked,kind", [
    (FIRST, 2, "error: strip: the trusted clean set has 10 images", False, "clear error"),
    (FIRST, 1, "FAILED (ParameterError: strip: the trusted clean set has 10 images)", True, "late error"),
    (FIRST, 2, "error: strip: clean set missing; pass --download", False, "misleading"),  # a flag run lacks
    (PIPE, 0, "│ badnets │ corner='bottom-rig… │", False, "silent"),  # a table cut in a pipe
    (PIPE, 0, "│ badnets │ corner='bottom-right' │", False, "handled"),
])
def test_classify_absent_words_and_late_errors(case, rc, output, worked, kind):
    assert H.classify(case, rc, output, None, worked)[0] == kind


def test_every_case_is_named_once_and_expects_something():
    names = [c.name for c in H.CASES]
    assert len(names) == len(set(names))
    for c in H.CASES:
        assert c.expect in ("error", "go on") and c.names


@pytest.mark.parametrize("name,kind", [
    ("config: not UTF-8", "clear error"), ("report: plot that is not a PNG", "handled"),
    # phase 2, a few seconds each: a refusal, a results file that is not rows, markup in a path, the umask,
    # and a message that must not suggest a flag `run` does not have
    ("run: empty config", "clear error"), ("report: results.json is [1,2,3]", "clear error"),
    ("report: [/x] in the folder path", "handled"), ("output files follow the umask (027)", "handled"),
    ("run --dry-run: dataset missing", "clear error"),
])
def test_cases_run_for_real(name, kind):
    case, = [c for c in H.CASES if c.name == name]
    outcome = H.run_case(case, timeout=120, memory_gib=4)
    assert outcome.kind == kind, outcome.detail
