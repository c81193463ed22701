"""Consent: whether a visitor may get personalized recommendations, and whether a message
may be used at all.

* **The opt-out trait** (``OPT_OUT_TRAIT``, default ``recommendations_opt_out``) counts as
  opted out for every value except absent, null, false, the number 0 and the strings
  ``false``, ``no``, ``off``, ``0`` and ``""`` (case-insensitive, spaces ignored). An
  unknown value (``"Y"``, ``"opted out"``, ``"unsubscribed"``, a list) never counts as
  consent. ``OPT_OUT_VALUES`` names more values that count as opted out, taken out of
  that list (``OPT_OUT_VALUES=0`` for a trait where 0 means "no").
* **Segment Consent Management**: with ``CONSENT_CATEGORIES`` set (e.g.
  ``Personalization``), a message whose ``context.consent.categoryPreferences`` denies
  any of them (``false``) is not used: not for recommendations, not sent to Personalize.
  A deletion request is never held back by it.
* **Whether a visitor consented** (``consent_of``): only when the opt-out was *read* and
  is not opted out, or the profile does not exist (nobody set a trait). A profile that
  could not be read (timeout, error, 429, over budget) is UNKNOWN: never personalized.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

# Consent, as far as the opt-out trait tells it.
GRANTED = "granted"  # the opt-out was read and is not opted out (or no profile exists)
OPTED_OUT = "opted_out"  # the opt-out was read and is opted out
UNKNOWN = "unknown"  # the profile could not be read: never personalized
NO_VISITOR = "no_visitor"  # items related to an item: nobody's traits are involved

# The values of the opt-out trait that mean "not opted out", as text (see ``_text``).
CONSENTING = frozenset({"false", "no", "off", "0", ""})


def _text(value: Any) -> str | None:
    """A trait value as the text it is compared by; None for an absent or null value,
    and for a value that is not a scalar (a list or an object: never consent)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return "0" if value == 0 else repr(value)
    if isinstance(value, str):
        return value.strip().lower()
    return "\x00not a scalar"


class OptOut:
    """The opt-out trait and its vocabulary."""

    def __init__(self, trait: str, opted_out_values: Iterable[str] = ()):
        self.trait = trait
        extra = {value.strip().lower() for value in opted_out_values}
        self.consenting = CONSENTING - extra

    def opted_out(self, value: Any) -> bool:
        """True unless ``value`` is absent or one of the consenting values."""
        text = _text(value)
        return text is not None and text not in self.consenting

    def of(self, traits: dict) -> bool:
        """Whether these traits say opted out."""
        return bool(self.trait) and self.opted_out(traits.get(self.trait))


def consent_of(profile, opt_out: OptOut) -> str:
    """GRANTED, OPTED_OUT, UNKNOWN or NO_VISITOR for a ``profiles.Profile`` (None: no
    visitor)."""
    if profile is None:
        return NO_VISITOR
    if not opt_out.trait:  # no opt-out configured: nothing to consent to
        return GRANTED
    if not profile.known:
        return UNKNOWN
    return OPTED_OUT if opt_out.of(profile.traits) else GRANTED


def denied_categories(raw: dict, categories: Iterable[str]) -> list[str]:
    """The configured consent categories a message's
    ``context.consent.categoryPreferences`` denies (explicitly ``false``), compared
    without regard to case. A message that says nothing about a category does not deny
    it."""
    context = raw.get("context")
    consent = context.get("consent") if isinstance(context, dict) else None
    preferences = consent.get("categoryPreferences") if isinstance(consent, dict) else None
    if not isinstance(preferences, dict):
        return []
    denied = {
        str(name).strip().lower() for name, allowed in preferences.items() if allowed is False
    }
    return [category for category in categories if category.strip().lower() in denied]
