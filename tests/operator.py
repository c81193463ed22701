"""The operator's token (METRICS_TOKEN) that every test app and test server is configured
with, as a deployment would be: /metrics and /healthz's details need it."""

OPERATOR_TOKEN = "operator-token-for-the-tests"
OPERATOR = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
