"""The README is the front door: every setting the service reads is documented there."""
from pathlib import Path

from webhook.config import _SOURCES

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_every_setting_is_in_the_readme():
    missing = [names[0] for _, names, _ in _SOURCES if f"`{names[0]}`" not in README]
    assert not missing, f"settings missing from README.md: {missing}"


def test_every_workshop_alias_is_in_the_readme():
    aliases = [name for _, names, _ in _SOURCES for name in names[1:] if name.islower()]
    missing = [alias for alias in aliases if f"`{alias}`" not in README]
    assert not missing, f"aliases missing from README.md: {missing}"


def test_ci_runs_the_readme_test_command_with_ci_set():
    """.ci/run is the README's test command on a fresh machine, with CI set so that a
    missing prerequisite fails the run (tests/prerequisites.py)."""
    assert "```sh\nmake test\n```" in README
    ci = (ROOT / ".ci" / "run").read_text()
    assert ci.rstrip().splitlines()[-1] == "make test"
    assert 'export CI="${CI:-1}"' in ci
