"""Bare Flask baseline for bench/webhook_throughput.py.

One route, ``POST /segment``, that returns "ok" without reading or verifying
the body: the ceiling that gunicorn + Flask reach on this machine, against
which the real webhook service is compared.
"""

from flask import Flask

app = Flask(__name__)


@app.post("/segment")
def segment():
    return "ok"
