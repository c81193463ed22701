"""The operator's token (METRICS_TOKEN) that every test app and test server is configured
with, as a deployment would be: /metrics and /healthz's details need it."""

OPERATOR_TOKEN = "operator-token-for-the-tests"
OPERATOR = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}

# The suite's messages carry fixed times, which fall behind the default age and retention
# bounds as the calendar moves on: test servers turn both off (tests/conftest.py, TIMELESS).
TIMELESS_ENV = {"MAX_MESSAGE_AGE_HOURS": "0", "INTERACTION_RETENTION_DAYS": "0"}
