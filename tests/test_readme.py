"""The README is the front door: every setting the service reads is documented there."""
from pathlib import Path

from webhook.config import _SOURCES

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_every_setting_is_in_the_readme():
    missing = [names[0] for _, names, _ in _SOURCES if f"`{names[0]}`" not in README]
    assert not missing, f"settings missing from README.md: {missing}"


def test_every_workshop_alias_is_in_the_readme():
    aliases = [name for _, names, _ in _SOURCES for name in names[1:] if name.islower()]
    missing = [alias for alias in aliases if f"`{alias}`" not in README]
    assert not missing, f"aliases missing from README.md: {missing}"
