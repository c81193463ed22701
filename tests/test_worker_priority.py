"""The worker's CPU priority (``WORKER_NICE``) and the process group it must stay in.

A process manager stops a process by signalling its process group (honcho: SIGTERM, then
SIGKILL), and a terminal's Ctrl-C reaches the foreground group; a worker that left its
group to get a scheduling session of its own kept running after ``make run`` was stopped.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
AUTOGROUP = Path("/proc/self/autogroup")

PROBE = (
    "import os; from webhook.worker import lower_priority; "
    "before = (os.getsid(0), os.getpgid(0)); lower_priority(10); "
    "print(os.nice(0), before == (os.getsid(0), os.getpgid(0)), "
    "open('/proc/self/autogroup').read().split()[-1])"
)

pytestmark = pytest.mark.skipif(
    not AUTOGROUP.exists(), reason="this kernel has no autogroup scheduling"
)


def probe(shell: str) -> list[str]:
    """Run the probe in a new session through ``shell`` (a shell that starts it, as
    honcho's ``sh -c`` does), and return what it printed: nice, same group, autogroup nice."""
    out = subprocess.run(
        ["bash", "-c", shell.replace("PROBE", f'{sys.executable} -c "{PROBE}"')],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        start_new_session=True,
        check=True,
    ).stdout
    return out.split()


def test_a_worker_alone_in_its_session_lowers_the_session_and_stays_in_its_group():
    nice, same_group, autogroup_nice = probe("PROBE; true")
    assert nice == "10"
    assert same_group == "True"
    assert autogroup_nice == "10"


def test_a_worker_sharing_its_session_leaves_the_others_priority_alone():
    # Another process of the session (the web process started from the same shell, say)
    # shares the autogroup: its priority must not drop with the worker's.
    nice, same_group, autogroup_nice = probe("sleep 30 & PROBE; kill %1")
    assert nice == "10"
    assert same_group == "True"
    assert autogroup_nice == "0"
    assert os.nice(0) == 0  # this process is untouched
