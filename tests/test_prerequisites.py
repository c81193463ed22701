"""A missing prerequisite fails the run under CI and is made up for elsewhere: shown on the
one test with a fallback for Node.js, run by pytest in a process whose PATH has no node."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
STORY = "tests/test_personalize.py::test_corpus_becomes_exactly_the_expected_putevents"


def run_without_node(ci: bool) -> subprocess.CompletedProcess:
    no_node = os.path.dirname(sys.executable)  # the virtual environment's bin: python only
    assert shutil.which("node", path=no_node) is None
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PATH"] = no_node
    if ci:
        env["CI"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", STORY],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow  # two pytest runs
def test_the_story_without_node_fails_under_ci_and_is_signed_by_python_elsewhere():
    elsewhere = run_without_node(ci=False)
    assert elsewhere.returncode == 0, elsewhere.stdout[-3000:]
    assert "1 passed" in elsewhere.stdout
    under_ci = run_without_node(ci=True)
    assert under_ci.returncode == 1, under_ci.stdout[-3000:]
    assert "CI needs node: Node.js (`node`) is not on PATH" in under_ci.stdout
