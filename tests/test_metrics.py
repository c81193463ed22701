"""The per-process tally of webhook deliveries (``metrics._Tally``) hands prometheus_client
the same counts as counting each delivery on its own would."""

from prometheus_client import CollectorRegistry, Counter, Histogram

from webhook.metrics import _Tally

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# Bucket bounds themselves included: a value equal to a bound belongs to that bucket.
SECONDS = [0.0001, 0.005, 0.0050001, 0.01, 0.02, 0.3, 0.5, 1.0, 4.99, 5.0, 7.5, 0.004]


def _samples(registry) -> dict:
    """Every sample but the creation times: {(name, labels): value}."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in registry.collect()
        for sample in family.samples
        if not sample.name.endswith("_created")
    }


def _metrics(registry):
    deliveries = Counter("d", "deliveries", ["status"], registry=registry)
    seconds = Histogram("s", "seconds", buckets=BUCKETS, registry=registry)
    return deliveries, seconds


def test_tally_gives_what_counting_each_delivery_gives():
    expected, tallied = CollectorRegistry(), CollectorRegistry()
    deliveries, seconds = _metrics(expected)
    for value in SECONDS:
        deliveries.labels("200").inc()
        seconds.observe(value)

    deliveries, seconds = _metrics(tallied)
    tally = _Tally(seconds)
    for value in SECONDS:
        tally.delivery(deliveries.labels("200"), value, {})
    assert _samples(tallied) != _samples(expected)  # not handed over yet
    tally.flush()
    assert _samples(tallied) == _samples(expected)
    tally.flush()  # nothing twice
    assert _samples(tallied) == _samples(expected)
