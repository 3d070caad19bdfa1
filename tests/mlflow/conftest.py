"""Fixtures shared by the MLflow client suites."""

import pytest
from mlflow import MlflowClient


@pytest.fixture()
def client():
    return MlflowClient()
