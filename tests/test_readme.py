"""The README is the front door: its settings tables are the settings the service reads,
no more and no fewer, with the defaults the service has."""

import re
from pathlib import Path

from pydantic import SecretStr

from webhook.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
# Read by gunicorn.conf.py and the Procfile, not by the application.
SERVER = {
    "PORT",
    "HOST",
    "GUNICORN_BIND",
    "WEB_CONCURRENCY",
    "GUNICORN_WORKER_CLASS",
    "GUNICORN_THREADS",
    "GUNICORN_TIMEOUT",
    "GUNICORN_KEEPALIVE",
    "GUNICORN_REUSE_PORT",
    "PROMETHEUS_MULTIPROC_DIR",
}
# Set by the platform, never by the user, and read by gunicorn.conf.py: named in the README
# where they change a default.
PLATFORM = {"DYNO"}


def settings_rows() -> dict[str, str]:
    """Each documented variable (every upper-case name in the first cell of a row of the
    '## Settings' section) with its default cell."""
    section = README.split("\n## Settings\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        for name in re.findall(r"`([A-Z][A-Z0-9_]+)`", cells[0]):
            rows[name] = cells[1]
    return rows


def test_every_setting_is_in_the_readme_and_every_documented_one_exists():
    names = Settings.env_names()
    canonical = {aliases[0] for aliases in names.values()}
    every = {alias for aliases in names.values() for alias in aliases}
    documented = set(settings_rows())
    assert canonical - documented == set(), "settings missing from README.md"
    assert documented - every - SERVER == set(), "README.md documents settings that do not exist"


def test_every_variable_the_server_reads_is_in_the_readme():
    read = set(
        re.findall(
            r"environ(?:\.get\(|\[)\"([A-Z][A-Z0-9_]+)\"", (ROOT / "gunicorn.conf.py").read_text()
        )
    )
    read |= set(re.findall(r"\$\{([A-Z][A-Z0-9_]+)", (ROOT / "Procfile").read_text()))
    unknown = read - SERVER - PLATFORM
    assert not unknown, f"read by gunicorn.conf.py or the Procfile, not listed: {unknown}"
    assert all(f"`{name}`" in README for name in PLATFORM)
    assert set(settings_rows()) >= SERVER, "server variables missing from README.md"


def test_every_workshop_alias_is_in_the_readme():
    aliases = [
        alias for names in Settings.env_names().values() for alias in names[1:] if alias.islower()
    ]
    missing = [alias for alias in aliases if f"`{alias}`" not in README]
    assert not missing, f"aliases missing from README.md: {missing}"


def test_the_readme_gives_each_setting_its_real_default():
    """Where the README's default is a plain value (a number, a word, `—` for none), it is
    the model's."""
    rows = settings_rows()
    checked = 0
    for field, aliases in Settings.env_names().items():
        cell = rows.get(aliases[0])
        default = Settings.model_fields[field].default
        if isinstance(default, SecretStr):
            default = default.get_secret_value()
        if cell == "—":
            assert default in ("", (), None) or (field == "max_message_age_hours"), field
            checked += 1
            continue
        match = re.fullmatch(r"`([^`]+)`(?: \(.*\))?", cell or "")
        if not match or isinstance(default, tuple):
            continue
        text = match.group(1)
        if isinstance(default, bool):
            assert text == str(default).lower(), (aliases[0], text, default)
        elif isinstance(default, (int, float)):
            assert float(text) == float(default), (aliases[0], text, default)
        elif default is not None:
            assert text == default, (aliases[0], text, default)
        checked += 1
    assert checked >= 40


def test_ci_runs_the_readme_test_command_with_ci_set():
    """.ci/run is the README's test command on a fresh machine, with CI set so that a
    missing prerequisite fails the run (tests/prerequisites.py)."""
    assert "```sh\nmake test\n```" in README
    ci = (ROOT / ".ci" / "run").read_text()
    assert ci.rstrip().splitlines()[-1] == "make test"
    assert 'export CI="${CI:-1}"' in ci
