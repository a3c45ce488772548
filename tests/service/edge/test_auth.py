"""API keys: admin routes need the admin key (client keys get 403), client routes need a key when keys are set."""

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from service.app import create_app
from service.settings import Settings

ADMIN_KEY = "admin-key-for-tests"
CLIENT_KEYS = ["client-one", "client-two"]
ADMIN_ROUTES = [
    ("GET", "/v1/rollouts", None),
    ("GET", "/v1/rollouts/tiny", None),
    ("PUT", "/v1/rollouts/tiny", {"canary_version": 2}),
    ("POST", "/v1/rollouts/tiny/promote", {}),
    ("POST", "/v1/rollouts/tiny/rollback", {}),
    ("POST", "/v1/rollouts/tiny/pause", {}),
    ("POST", "/v1/rollouts/tiny/resume", {}),
    ("POST", "/v1/rollouts/tiny/weight", {"weight": 10}),
]
# The admin key's outcomes: 200, or 400/404/409 for what the rollout's state allows; never 401/403 or a 5xx.
ADMITTED = {200, 400, 404, 409}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def keyed(settings: Settings) -> Iterator[TestClient]:
    configured = settings.model_copy(
        update={
            "admin_api_key": SecretStr(ADMIN_KEY),
            "api_keys": [SecretStr(key) for key in CLIENT_KEYS],
            "stable_versions": {"tiny": 1},
        }
    )
    with TestClient(create_app(configured)) as client:
        yield client


@pytest.mark.parametrize(("method", "path", "body"), ADMIN_ROUTES)
def test_admin_routes_refuse_anything_but_the_admin_key(keyed: TestClient, method: str, path: str, body: dict | None):
    def call(headers: dict[str, str]) -> int:
        return keyed.request(method, path, json=body, headers=headers).status_code

    assert call({}) == 401
    assert call(bearer("not-a-key")) == 401
    assert call({"Authorization": ADMIN_KEY}) == 401  # no Bearer scheme
    assert all(call(bearer(key)) == 403 for key in CLIENT_KEYS)
    assert call(bearer(ADMIN_KEY)) in ADMITTED


def test_refusals_are_openai_shaped(keyed: TestClient) -> None:
    missing = keyed.get("/v1/rollouts")
    assert missing.json()["error"]["type"] == "authentication_error"
    client_key = keyed.get("/v1/rollouts", headers=bearer(CLIENT_KEYS[0]))
    assert client_key.json()["error"]["type"] == "permission_error"
    assert "admin API key" in client_key.json()["error"]["message"]


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/v1/embeddings", {"input": "hello", "model": "tiny"}),
        ("GET", "/v1/models", None),
        ("GET", "/v1/collections", None),
    ],
)
def test_client_routes_need_a_client_key_when_keys_are_set(
    keyed: TestClient, method: str, path: str, body: dict | None
) -> None:
    def call(headers: dict[str, str]) -> int:
        return keyed.request(method, path, json=body, headers=headers).status_code

    assert call({}) == 401
    assert call(bearer("not-a-key")) == 401
    assert call(bearer(CLIENT_KEYS[1])) == 200
    assert call(bearer(ADMIN_KEY)) == 200


def test_health_and_metrics_stay_open(keyed: TestClient) -> None:
    assert keyed.get("/healthz").status_code == 200
    assert keyed.get("/metrics").status_code == 200


def test_without_an_admin_key_the_admin_api_is_disabled(client: TestClient) -> None:
    response = client.get("/v1/rollouts", headers=bearer("anything"))
    assert response.status_code == 403
    assert response.json()["error"]["message"] == "admin API disabled: set EMBEDSERVE_ADMIN_API_KEY."
    assert client.get("/v1/models").status_code == 200  # no client keys configured: open
