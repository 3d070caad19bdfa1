"""The stock MLflow client (mlflow-skinny) against a running Agora node.

Run by tests/tests/it/mlflow.rs, which starts the chain and the node and sets
MLFLOW_TRACKING_URI, MLFLOW_TRACKING_TOKEN and AGORA_URL.
"""

import hashlib
import json
import os

import pytest
import requests
from mlflow.artifacts import download_artifacts
from mlflow.exceptions import MlflowException
from mlflow.store.artifact.mlflow_artifacts_repo import MlflowArtifactsRepository

from common import error_code, unique

# Stages are deprecated upstream but still part of the protocol this node answers.
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")

URL = os.environ["AGORA_URL"]
TOKEN = os.environ["MLFLOW_TRACKING_TOKEN"]


def safetensors(rows, seed):
    data = bytes((i * seed + 7) % 251 for i in range(rows * 16 * 4))
    header = json.dumps({"w": {"dtype": "F32", "shape": [rows, 16], "data_offsets": [0, len(data)]}}).encode()
    return len(header).to_bytes(8, "little") + header + data


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_models_tags_descriptions_and_errors(client):
    name = unique("py-model")
    model = client.create_registered_model(name, tags={"team": "risk"}, description="first")
    assert model.name == name
    assert model.tags == {"team": "risk"}
    assert model.description == "first"
    assert model.creation_timestamp > 0

    with pytest.raises(MlflowException) as e:
        client.create_registered_model(name)
    assert error_code(e) == "RESOURCE_ALREADY_EXISTS"

    client.set_registered_model_tag(name, "owner", "ml-platform")
    client.delete_registered_model_tag(name, "team")
    client.update_registered_model(name, description="second")
    got = client.get_registered_model(name)
    assert got.tags == {"owner": "ml-platform"}
    assert got.description == "second"

    with pytest.raises(MlflowException) as e:
        client.get_registered_model(unique("missing"))
    assert error_code(e) == "RESOURCE_DOES_NOT_EXIST"

    renamed = unique("py-renamed")
    client.rename_registered_model(name, renamed)
    assert client.get_registered_model(renamed).name == renamed
    with pytest.raises(MlflowException) as e:
        client.get_registered_model(name)
    assert error_code(e) == "RESOURCE_DOES_NOT_EXIST"
    client.delete_registered_model(renamed)
    with pytest.raises(MlflowException) as e:
        client.delete_registered_model(renamed)
    assert error_code(e) == "RESOURCE_DOES_NOT_EXIST"


def test_versions_aliases_and_stages(client):
    name = unique("py-staged")
    client.create_registered_model(name)
    versions = [
        client.create_model_version(name, f"s3://bucket/{name}/{i}", run_id=f"run-{i}", tags={"i": str(i)})
        for i in range(1, 4)
    ]
    assert [v.version for v in versions] == ["1", "2", "3"]
    assert versions[0].current_stage == "None"
    assert versions[0].status == "READY"
    assert versions[1].tags == {"i": "2"}

    client.update_model_version(name, "1", description="baseline")
    client.set_model_version_tag(name, "1", "validated", "yes")
    client.delete_model_version_tag(name, "1", "i")
    v1 = client.get_model_version(name, "1")
    assert v1.description == "baseline"
    assert v1.tags == {"validated": "yes"}
    assert v1.source == f"s3://bucket/{name}/1"
    assert v1.run_id == "run-1"

    client.set_registered_model_alias(name, "champion", "1")
    assert client.get_model_version_by_alias(name, "champion").version == "1"
    client.set_registered_model_alias(name, "champion", "2")
    assert client.get_model_version_by_alias(name, "champion").version == "2"
    assert client.get_registered_model(name).aliases == {"champion": "2"}
    for reserved in ["latest", "v3"]:
        with pytest.raises(MlflowException) as e:
            client.set_registered_model_alias(name, reserved, "1")
        assert error_code(e) == "INVALID_PARAMETER_VALUE"
    client.delete_registered_model_alias(name, "champion")
    with pytest.raises(MlflowException) as e:
        client.get_model_version_by_alias(name, "champion")
    assert error_code(e) == "RESOURCE_DOES_NOT_EXIST"

    client.transition_model_version_stage(name, "1", "production")
    client.transition_model_version_stage(name, "2", "Production", archive_existing_versions=True)
    assert client.get_model_version(name, "1").current_stage == "Archived"
    assert client.get_model_version(name, "2").current_stage == "Production"
    client.transition_model_version_stage(name, "3", "Staging")
    latest = client.get_latest_versions(name, stages=["Production"])
    assert [v.version for v in latest] == ["2"]
    by_stage = {v.current_stage: v.version for v in client.get_latest_versions(name)}
    assert by_stage == {"Production": "2", "Staging": "3", "Archived": "1"}
    with pytest.raises(MlflowException) as e:
        client.transition_model_version_stage(name, "3", "Live")
    assert error_code(e) == "INVALID_PARAMETER_VALUE"

    client.delete_model_version(name, "3")
    with pytest.raises(MlflowException) as e:
        client.get_model_version(name, "3")
    assert error_code(e) == "RESOURCE_DOES_NOT_EXIST"
    assert client.create_model_version(name, "s3://bucket/again").version == "4"

    with pytest.raises(MlflowException) as e:
        client.create_model_version(name, "s3://bucket/../etc/passwd")
    assert error_code(e) == "INVALID_PARAMETER_VALUE"
    with pytest.raises(MlflowException) as e:
        client.create_model_version(unique("missing"), "s3://bucket/x")
    assert error_code(e) == "RESOURCE_DOES_NOT_EXIST"


def test_search_with_filters_order_and_paging(client):
    prefix = unique("py-search")
    names = [f"{prefix}-{i}" for i in range(5)]
    for i, name in enumerate(names):
        client.create_registered_model(name, tags={"parity": "even" if i % 2 == 0 else "odd"})
        client.create_model_version(name, f"s3://bucket/{name}", run_id=f"{prefix}-run-{i}", tags={"rank": str(i)})

    found = client.search_registered_models(filter_string=f"name LIKE '{prefix}-%'")
    assert [m.name for m in found] == names
    even = client.search_registered_models(filter_string=f"name LIKE '{prefix}%' AND tags.parity = 'even'")
    assert [m.name for m in even] == names[0::2]
    desc = client.search_registered_models(filter_string=f"name ILIKE '{prefix.upper()}-%'", order_by=["name DESC"])
    assert [m.name for m in desc] == names[::-1]

    page = client.search_registered_models(filter_string=f"name LIKE '{prefix}-%'", max_results=2)
    seen = [m.name for m in page]
    while page.token:
        page = client.search_registered_models(
            filter_string=f"name LIKE '{prefix}-%'", max_results=2, page_token=page.token
        )
        seen += [m.name for m in page]
    assert seen == names

    versions = client.search_model_versions(f"name = '{names[3]}'")
    assert [(v.name, v.version) for v in versions] == [(names[3], "1")]
    by_run = client.search_model_versions(f"run_id IN ('{prefix}-run-1', '{prefix}-run-2')")
    assert sorted(v.name for v in by_run) == names[1:3]
    by_tag = client.search_model_versions(f"tags.`rank` = '4' AND name LIKE '{prefix}%'")
    assert [v.name for v in by_tag] == [names[4]]

    with pytest.raises(MlflowException) as e:
        client.search_model_versions("nonsense ~ 3")
    assert error_code(e) == "INVALID_PARAMETER_VALUE"


def test_download_by_alias_of_uploaded_files(client, tmp_path):
    name = unique("py-files")
    weights = tmp_path / "weights.bin"
    weights.write_bytes(os.urandom(300_000))
    (tmp_path / "MLmodel").write_text("flavors: {}\n")
    root = f"uploads/{name}"
    repo = MlflowArtifactsRepository(f"mlflow-artifacts:/{root}")
    repo.log_artifact(str(weights))
    repo.log_artifact(str(tmp_path / "MLmodel"))
    assert sorted(f.path for f in repo.list_artifacts()) == ["MLmodel", "weights.bin"]

    client.create_registered_model(name)
    version = client.create_model_version(name, f"mlflow-artifacts:/{root}")
    client.set_registered_model_alias(name, "champion", version.version)
    assert version.source == f"mlflow-artifacts:/{root}"
    # the version holds its own copy of the files, so what happens to the uploads afterwards
    # does not change what was registered
    uri = client.get_model_version_download_uri(name, version.version)
    assert uri.startswith("mlflow-artifacts:/registry/"), uri
    repo.log_artifact(str(tmp_path / "MLmodel"), "extra")
    (tmp_path / "MLmodel").write_text("flavors: {changed: {}}\n")
    repo.log_artifact(str(tmp_path / "MLmodel"))
    repo.delete_artifacts()
    assert repo.list_artifacts() == []
    (tmp_path / "MLmodel").write_text("flavors: {}\n")

    out = download_artifacts(f"models:/{name}@champion", dst_path=str(tmp_path / "out"))
    assert "extra" not in os.listdir(out), "what was logged after registering is not the version's"
    assert sha256(os.path.join(out, "weights.bin")) == sha256(weights)
    assert open(os.path.join(out, "MLmodel")).read() == "flavors: {}\n"


def test_a_copied_version_holds_the_files_of_the_one_it_copies(client, tmp_path):
    name = unique("py-copy")
    weights = tmp_path / "weights.bin"
    weights.write_bytes(os.urandom(100_000))
    repo = MlflowArtifactsRepository(f"mlflow-artifacts:/uploads/{name}")
    repo.log_artifact(str(weights))
    client.create_registered_model(name)
    source = client.create_model_version(name, f"mlflow-artifacts:/uploads/{name}", tags={"k": "v"})

    copy = client.copy_model_version(f"models:/{name}/{source.version}", f"{name}-copy")
    assert (copy.name, copy.version) == (f"{name}-copy", "1")
    assert copy.source == f"models:/{name}/{source.version}"
    assert copy.tags == {"k": "v"}
    client.set_registered_model_alias(name, "champion", source.version)
    by_alias = client.copy_model_version(f"models:/{name}@champion", f"{name}-copy")
    assert by_alias.version == "2"
    # as MLflow's server reads model URIs: the newest version, or the newest in a stage
    client.transition_model_version_stage(name, source.version, "Staging")
    for which in ["latest", "Staging", "staging"]:
        copied = client.create_model_version(f"{name}-copy", f"models:/{name}/{which}")
        out = download_artifacts(f"models:/{name}-copy/{copied.version}", dst_path=str(tmp_path / which))
        assert sha256(os.path.join(out, "weights.bin")) == sha256(weights)
    with pytest.raises(MlflowException) as none_there:
        client.create_model_version(f"{name}-copy", f"models:/{name}/Production")
    assert error_code(none_there) == "RESOURCE_DOES_NOT_EXIST"
    for version in ["3", "4", "5"]:
        client.delete_model_version(f"{name}-copy", version)

    # the copies are their own: the original version deleted, they download whole
    client.delete_model_version(name, source.version)
    for version in ["1", "2"]:
        out = download_artifacts(f"models:/{name}-copy/{version}", dst_path=str(tmp_path / version))
        assert sha256(os.path.join(out, "weights.bin")) == sha256(weights)

    with pytest.raises(MlflowException) as missing:
        client.create_model_version(f"{name}-copy", f"models:/{name}/{source.version}")
    assert error_code(missing) == "RESOURCE_DOES_NOT_EXIST"
    with pytest.raises(MlflowException) as bad:
        client.create_model_version(f"{name}-copy", f"models:/{name}/newest")
    assert error_code(bad) == "INVALID_PARAMETER_VALUE"
    assert "neither a version number, 'latest' nor a stage" in str(bad.value)
    assert [v.version for v in client.search_model_versions(f"name = '{name}-copy'")] == ["2", "1"]


def test_a_file_registered_through_the_node_api_downloads_through_mlflow(client, tmp_path):
    name = unique("py-cross")
    body = safetensors(64, 3)
    response = requests.post(
        f"{URL}/api/v1/models/register",
        headers={"Authorization": f"Bearer {TOKEN}"},
        files={
            "metadata": (None, json.dumps({"name": name, "tags": {"from": "node-api"}})),
            "artifact": ("model.safetensors", body, "application/octet-stream"),
        },
        timeout=30,
    )
    assert response.status_code == 201, response.text
    assert response.json()["file"]["blake3"]

    got = client.get_registered_model(name)
    assert got.tags == {"from": "node-api"}
    assert [v.version for v in got.latest_versions] == ["1"]
    client.set_registered_model_alias(name, "prod", "1")
    out = download_artifacts(f"models:/{name}@prod", dst_path=str(tmp_path / "out"))
    with open(os.path.join(out, "model.safetensors"), "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == hashlib.sha256(body).hexdigest()

    # And a version made through MLflow shows in the node's API.
    client.create_model_version(name, "s3://bucket/elsewhere")
    listed = requests.get(f"{URL}/api/v1/models/{name}/versions", timeout=30).json()
    assert [v["version"] for v in listed["versions"]] == [2, 1]


def test_wire_details_the_client_relies_on():
    missing = requests.get(f"{URL}/api/2.0/mlflow/logged-models/abc", timeout=30)
    assert missing.status_code == 404
    assert missing.json()["error_code"] == "RESOURCE_DOES_NOT_EXIST"

    unauthenticated = requests.post(
        f"{URL}/api/2.0/mlflow/registered-models/create", json={"name": unique("nope")}, timeout=30
    )
    assert unauthenticated.status_code == 401
    assert unauthenticated.json()["error_code"] == "UNAUTHENTICATED"
    wrong = requests.post(
        f"{URL}/api/2.0/mlflow/registered-models/create",
        json={"name": unique("nope")},
        headers={"Authorization": "Bearer not-the-token"},
        timeout=30,
    )
    assert wrong.status_code == 401

    malformed = requests.post(
        f"{URL}/api/2.0/mlflow/registered-models/create",
        data="{not json",
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
        timeout=30,
    )
    assert malformed.status_code == 400
    assert malformed.json()["error_code"] == "MALFORMED_REQUEST"

    bad_page = requests.get(
        f"{URL}/api/2.0/mlflow/registered-models/search", params={"page_token": "zz"}, timeout=30
    )
    assert bad_page.status_code == 400
    assert bad_page.json()["error_code"] == "INVALID_PARAMETER_VALUE"
