"""Helpers shared by the MLflow client suites."""

import uuid


def unique(prefix):
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def error_code(excinfo):
    return excinfo.value.error_code
