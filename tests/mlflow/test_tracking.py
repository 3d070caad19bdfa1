"""MLflow's tracking API (experiments and runs) through the stock client against a running node.

Run by tests/tests/it/mlflow.rs, as test_registry.py.
"""

import math
import os
import uuid

import mlflow
import pytest
import requests
from mlflow.entities import Metric, Param, RunTag, ViewType
from mlflow.exceptions import MlflowException

from common import error_code, unique


def test_a_training_script_logs_a_run(client, tmp_path):
    name = unique("train")
    experiment = mlflow.set_experiment(name)
    assert experiment.name == name
    assert experiment.artifact_location == f"mlflow-artifacts:/{experiment.experiment_id}"
    notes = tmp_path / "notes.txt"
    notes.write_text("hello from a run")
    with mlflow.start_run(run_name="first") as run:
        mlflow.log_param("lr", "0.01")
        mlflow.log_params({"layers": 3, "activation": "relu"})
        for step in range(5):
            mlflow.log_metric("loss", 1.0 / (step + 1), step=step)
        mlflow.log_metrics({"acc": 0.9, "diverged": float("nan"), "bound": float("inf")})
        mlflow.set_tags({"team": "risk", "stage": "dev"})
        mlflow.log_artifact(str(notes))
        mlflow.log_dict({"hidden": [8, 3]}, "config/model.json")
        run_id = run.info.run_id

    got = client.get_run(run_id)
    assert got.info.status == "FINISHED"
    assert got.info.run_name == "first"
    assert got.info.experiment_id == experiment.experiment_id
    assert got.info.end_time >= got.info.start_time > 0
    assert got.info.artifact_uri == f"mlflow-artifacts:/{experiment.experiment_id}/{run_id}/artifacts"
    assert got.data.params == {"lr": "0.01", "layers": "3", "activation": "relu"}
    assert got.data.metrics["loss"] == pytest.approx(0.2)
    assert got.data.metrics["acc"] == pytest.approx(0.9)
    assert math.isnan(got.data.metrics["diverged"])
    assert got.data.metrics["bound"] == float("inf")
    assert got.data.tags["team"] == "risk"
    assert got.data.tags["mlflow.runName"] == "first"

    history = client.get_metric_history(run_id, "loss")
    assert [m.step for m in history] == [0, 1, 2, 3, 4]
    assert [m.value for m in history] == pytest.approx([1.0 / (s + 1) for s in range(5)])

    assert sorted(f.path for f in client.list_artifacts(run_id)) == ["config", "notes.txt"]
    local = client.download_artifacts(run_id, "notes.txt", str(tmp_path))
    with open(local) as f:
        assert f.read() == "hello from a run"
    assert mlflow.artifacts.load_dict(f"runs:/{run_id}/config/model.json") == {"hidden": [8, 3]}

    with pytest.raises(MlflowException) as e:
        client.log_param(run_id, "lr", "0.02")
    assert error_code(e) == "INVALID_PARAMETER_VALUE"
    client.log_param(run_id, "lr", "0.01")  # the same value again is accepted
    with pytest.raises(MlflowException) as e:
        client.get_run(uuid.uuid4().hex)
    assert error_code(e) == "RESOURCE_DOES_NOT_EXIST"


def test_runs_are_searched_ordered_and_paged(client):
    experiment = client.create_experiment(unique("search"))
    ids = []
    for i in range(5):
        run = client.create_run(experiment, run_name=f"r{i}", start_time=1_000 + i)
        client.log_batch(
            run.info.run_id,
            metrics=[Metric("acc", i / 10, 0, 0)],
            params=[Param("i", str(i))],
            tags=[RunTag("parity", "even" if i % 2 == 0 else "odd")],
        )
        ids.append(run.info.run_id)

    def names(runs):
        return [r.info.run_name for r in runs]

    assert names(client.search_runs([experiment])) == ["r4", "r3", "r2", "r1", "r0"]
    found = client.search_runs(
        [experiment], "metrics.acc > 0.15 AND tags.parity = 'even'", order_by=["metrics.acc DESC"]
    )
    assert names(found) == ["r4", "r2"]
    assert names(client.search_runs([experiment], "params.i = '3'")) == ["r3"]

    first = client.search_runs([experiment], "attributes.run_name LIKE 'r%'", order_by=["metrics.acc ASC"], max_results=2)
    assert names(first) == ["r0", "r1"] and first.token
    second = client.search_runs(
        [experiment], "attributes.run_name LIKE 'r%'", order_by=["metrics.acc ASC"], max_results=2, page_token=first.token
    )
    assert names(second) == ["r2", "r3"]

    client.set_terminated(ids[1], "FAILED")
    assert names(client.search_runs([experiment], "attributes.status = 'FAILED'")) == ["r1"]

    client.delete_run(ids[0])
    assert len(client.search_runs([experiment])) == 4
    deleted = client.search_runs([experiment], run_view_type=ViewType.DELETED_ONLY)
    assert [r.info.run_id for r in deleted] == [ids[0]]
    assert client.get_run(ids[0]).info.lifecycle_stage == "deleted"
    # a deleted run takes nothing until it is restored, files included
    with pytest.raises(Exception) as late:
        client.log_text(ids[0], "too late", "late.txt")
    assert "must be in the 'active' state" in str(late.value)
    client.restore_run(ids[0])
    client.log_text(ids[0], "in time", "late.txt")
    assert [f.path for f in client.list_artifacts(ids[0])] == ["late.txt"]
    assert len(client.search_runs([experiment])) == 5

    with pytest.raises(MlflowException) as e:
        client.search_runs([experiment], "metrics.acc > 'high'")
    assert error_code(e) == "INVALID_PARAMETER_VALUE"


def test_experiments_are_named_tagged_deleted_and_restored(client):
    name = unique("exp")
    experiment_id = client.create_experiment(name, tags={"team": "risk"})
    experiment = client.get_experiment(experiment_id)
    assert experiment.name == name
    assert experiment.tags == {"team": "risk"}
    assert experiment.lifecycle_stage == "active"
    assert client.get_experiment_by_name(name).experiment_id == experiment_id
    assert client.get_experiment_by_name(unique("none")) is None
    assert client.get_experiment("0").name == "Default"

    with pytest.raises(MlflowException) as e:
        client.create_experiment(name)
    assert error_code(e) == "RESOURCE_ALREADY_EXISTS"

    client.rename_experiment(experiment_id, name + "-renamed")
    client.set_experiment_tag(experiment_id, "stage", "dev")
    found = client.search_experiments(filter_string=f"name = '{name}-renamed'")
    assert [e.experiment_id for e in found] == [experiment_id]
    assert found[0].tags == {"team": "risk", "stage": "dev"}

    client.delete_experiment(experiment_id)
    assert client.get_experiment(experiment_id).lifecycle_stage == "deleted"
    assert not client.search_experiments(filter_string=f"name = '{name}-renamed'")
    deleted = client.search_experiments(view_type=ViewType.DELETED_ONLY, filter_string=f"name LIKE '{name}%'")
    assert [e.experiment_id for e in deleted] == [experiment_id]
    with pytest.raises(MlflowException) as e:
        client.create_run(experiment_id)
    assert error_code(e) == "INVALID_PARAMETER_VALUE"
    client.restore_experiment(experiment_id)
    run = client.create_run(experiment_id)
    assert run.info.run_name


def test_a_registered_version_names_the_run_that_made_it(client, tmp_path):
    experiment = client.create_experiment(unique("lineage"))
    run = client.create_run(experiment, run_name="fit")
    weights = tmp_path / "weights.bin"
    weights.write_bytes(bytes(range(256)) * 4)
    client.log_artifact(run.info.run_id, str(weights), "model")
    client.set_terminated(run.info.run_id)
    name = unique("lineage-model")
    client.create_registered_model(name)
    version = client.create_model_version(
        name, f"{run.info.artifact_uri}/model", run_id=run.info.run_id
    )
    assert version.run_id == run.info.run_id
    found = client.search_model_versions(f"run_id = '{run.info.run_id}'")
    assert [v.name for v in found] == [name]
    local = mlflow.artifacts.download_artifacts(f"runs:/{run.info.run_id}/model/weights.bin", dst_path=str(tmp_path / "dl"))
    with open(local, "rb") as f:
        assert f.read() == weights.read_bytes()


def test_bad_requests_name_what_is_wrong_and_change_nothing(client):
    url = os.environ["AGORA_URL"] + "/api/2.0/mlflow"
    auth = {"Authorization": f"Bearer {os.environ['MLFLOW_TRACKING_TOKEN']}"}
    run = client.create_run("0")
    run_id = run.info.run_id

    def post(path, body):
        answer = requests.post(f"{url}/{path}", json=body, headers=auth, timeout=30)
        return answer.status_code, answer.json()

    for path, body, status, code, says in [
        ("runs/log-metric", {"key": "loss", "value": 1.0}, 400, "INVALID_PARAMETER_VALUE", "run_id"),
        ("runs/log-metric", {"run_id": run_id, "key": "loss", "value": "high"}, 400, "INVALID_PARAMETER_VALUE", "not a number"),
        ("runs/log-metric", {"run_id": run_id, "key": "a\tb", "value": 1}, 400, "INVALID_PARAMETER_VALUE", "keys take"),
        ("runs/log-batch", {"run_id": run_id, "params": [{"key": "p", "value": "x" * 6001}]}, 400, "INVALID_PARAMETER_VALUE", "longer than"),
        ("runs/update", {"run_id": run_id, "status": "DONE"}, 400, "INVALID_PARAMETER_VALUE", "not a run status"),
        ("runs/create", {"experiment_id": "12345678"}, 404, "RESOURCE_DOES_NOT_EXIST", "12345678"),
        ("runs/create", {"experiment_id": "first"}, 400, "INVALID_PARAMETER_VALUE", "first"),
        ("runs/set-tag", {"run_id": "0" * 32, "key": "k", "value": "v"}, 404, "RESOURCE_DOES_NOT_EXIST", "0" * 32),
    ]:
        got_status, got = post(path, body)
        assert (got_status, got["error_code"]) == (status, code), (path, body, got)
        assert says in got["message"], (path, got)
    answer = requests.post(f"{url}/runs/log-metric", data="{not json", headers=auth, timeout=30)
    assert (answer.status_code, answer.json()["error_code"]) == (400, "MALFORMED_REQUEST")
    anonymous = requests.post(f"{url}/runs/create", json={"experiment_id": "0"}, timeout=30)
    assert (anonymous.status_code, anonymous.json()["error_code"]) == (401, "UNAUTHENTICATED")

    got = client.get_run(run_id)
    assert not got.data.metrics and not got.data.params
    assert got.info.status == "RUNNING"


def test_register_model_from_a_run_uri(client, tmp_path):
    experiment = client.create_experiment(unique("register"))
    run = client.create_run(experiment)
    model = tmp_path / "model"
    model.mkdir()
    (model / "MLmodel").write_text("artifact_path: model\nflavors: {}\n")
    (model / "weights.bin").write_bytes(b"\x01\x02" * 100)
    client.log_artifacts(run.info.run_id, str(model), "model")
    name = unique("from-run")
    version = mlflow.register_model(f"runs:/{run.info.run_id}/model", name)
    assert version.run_id == run.info.run_id
    assert version.source == f"{run.info.artifact_uri}/model"
    local = mlflow.artifacts.download_artifacts(f"models:/{name}/{version.version}", dst_path=str(tmp_path / "m"))
    with open(os.path.join(local, "weights.bin"), "rb") as f:
        assert f.read() == (model / "weights.bin").read_bytes()

    # a run path without an MLmodel file is no model, as MLflow's own server answers
    client.log_artifact(run.info.run_id, str(model / "weights.bin"), "loose")
    with pytest.raises(MlflowException) as e:
        mlflow.register_model(f"runs:/{run.info.run_id}/loose", name)
    assert "Unable to find a logged_model" in str(e.value)


class Adder(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return [x + 1 for x in model_input]


def test_log_model_registers_and_loads_back(client):
    mlflow.set_experiment(unique("logged"))
    with mlflow.start_run() as run:
        mlflow.log_param("kind", "adder")
        info = mlflow.pyfunc.log_model(name="adder", python_model=Adder(), pip_requirements=[])
    assert info.model_id.startswith("m-")
    assert info.model_uri == f"models:/{info.model_id}"

    logged = client.get_logged_model(info.model_id)
    assert logged.name == "adder"
    assert logged.source_run_id == run.info.run_id
    assert logged.params["kind"] == "adder"
    assert logged.artifact_location.endswith(f"/models/{info.model_id}/artifacts")
    assert [o.model_id for o in client.get_run(run.info.run_id).outputs.model_outputs] == [info.model_id]
    found = client.search_logged_models([run.info.experiment_id], filter_string="name = 'adder'")
    assert [m.model_id for m in found] == [info.model_id]

    assert mlflow.pyfunc.load_model(info.model_uri).predict([1, 2]) == [2, 3]

    name = unique("adder")
    version = mlflow.register_model(info.model_uri, name)
    assert version.run_id == run.info.run_id
    assert mlflow.pyfunc.load_model(f"models:/{name}/{version.version}").predict([41]) == [42]
    links = client.get_logged_model(info.model_id).tags["mlflow.modelVersions"]
    assert name in links

    # metrics logged for the model rank it among others
    with mlflow.start_run(run_id=run.info.run_id):
        mlflow.log_metric("accuracy", 0.93, model_id=info.model_id)
        other = mlflow.pyfunc.log_model(name="other", python_model=Adder(), pip_requirements=[])
        mlflow.log_metric("accuracy", 0.81, model_id=other.model_id)
    assert client.get_logged_model(info.model_id).metrics[0].value == pytest.approx(0.93)
    ranked = client.search_logged_models(
        [run.info.experiment_id], order_by=[{"field_name": "metrics.accuracy", "ascending": False}]
    )
    assert [m.model_id for m in ranked] == [info.model_id, other.model_id]

    client.delete_logged_model(info.model_id)
    with pytest.raises(MlflowException) as e:
        client.get_logged_model(info.model_id)
    assert error_code(e) == "RESOURCE_DOES_NOT_EXIST"


def test_nested_runs_and_the_dataframe_search(client):
    experiment = mlflow.set_experiment(unique("sweep"))
    with mlflow.start_run(run_name="sweep") as parent:
        for lr in (0.1, 0.01):
            with mlflow.start_run(run_name=f"lr-{lr}", nested=True):
                mlflow.log_param("lr", lr)
                mlflow.log_metric("loss", lr * 10)
    children = client.search_runs(
        [experiment.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'", order_by=["metrics.loss"]
    )
    assert [r.info.run_name for r in children] == ["lr-0.01", "lr-0.1"]

    frame = mlflow.search_runs([experiment.experiment_id], order_by=["attributes.run_name DESC"])
    assert list(frame["tags.mlflow.runName"]) == ["sweep", "lr-0.1", "lr-0.01"]
    assert sorted(frame["params.lr"].dropna()) == ["0.01", "0.1"]
    assert frame["metrics.loss"].dropna().tolist() == pytest.approx([1.0, 0.1])
    assert frame["run_id"].tolist()[0] == parent.info.run_id
