"""Only for ``make demo``: the wall clock of the demo's service, set back by the demo.

``demo/run.py`` starts the service with this folder on ``PYTHONPATH`` and
``DEMO_CLOCK_FILE`` naming a file that holds an offset in seconds; Python loads this
module in every process of the service (the gunicorn master and workers, the appliers'
process, the engine's training child) before anything else. ``time.time`` and
``time.time_ns`` then answer the real time plus the offset, read again from the file at
most four times a second. The monotonic clocks that timeouts and gunicorn's worker checks
use are left alone.

It lets the demo's service live through the 14 days of an experiment in a minute or two:
each answer is recorded at the time the service believes it gave it, as it would be on
any day. Nothing of the service is changed, and nothing outside the demo loads this.
"""

import os
import threading
import time

_FILE = os.environ.get("DEMO_CLOCK_FILE")

if _FILE:
    _real_time, _real_time_ns = time.time, time.time_ns
    _lock = threading.Lock()
    _offset = [0.0, float("-inf")]  # seconds; when to read the file again (monotonic)

    def _current_offset() -> float:
        now = time.monotonic()
        if now >= _offset[1]:
            with _lock:
                try:
                    with open(_FILE, encoding="ascii") as handle:
                        _offset[0] = float(handle.read().strip() or 0)
                except (OSError, ValueError):
                    pass
                _offset[1] = now + 0.25
        return _offset[0]

    def _time() -> float:
        return _real_time() + _current_offset()

    def _time_ns() -> int:
        return _real_time_ns() + int(_current_offset() * 1e9)

    time.time = _time
    time.time_ns = _time_ns
