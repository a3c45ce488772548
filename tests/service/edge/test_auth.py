"""API keys and their scopes: admin routes need the admin key (client keys get 403), data routes need a key with
their scope when keys are set, and collection writes are refused to anonymous callers unless allowed."""

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from service.app import create_app
from service.settings import ApiKey, Settings

ADMIN_KEY = "admin-key-for-tests"
CLIENT_KEYS = ["client-one", "client-two"]  # plain keys: scopes embed and search
EMBED_ONLY_KEY = "embed-only"
WRITER_KEY = "writer"
WRITE_ROUTES = [
    ("PUT", "/v1/collections/scoped", {"model": "tiny@1"}),
    ("POST", "/v1/collections/scoped/items", {"items": [{"id": "a", "text": "an item"}]}),
    ("DELETE", "/v1/collections/scoped/items/a", None),
    ("POST", "/v1/collections/scoped/reindex", {"version": 2}),
    ("DELETE", "/v1/collections/scoped", None),
]
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
            "api_keys": [
                *(ApiKey(key=SecretStr(key)) for key in CLIENT_KEYS),
                ApiKey(key=SecretStr(EMBED_ONLY_KEY), scopes=frozenset({"embed"})),
                ApiKey(key=SecretStr(WRITER_KEY), scopes=frozenset({"embed", "search", "write"})),
            ],
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


def test_destructive_routes_need_the_write_scope(keyed: TestClient) -> None:
    """Each route in its order (create, upsert, delete an item, re-index, drop): 401 without a key, 403 with an
    embed-only or a read-only key, 2xx with a write key."""
    for method, path, body in WRITE_ROUTES:

        def call(headers: dict[str, str], method: str = method, path: str = path, body: dict | None = body) -> int:
            return keyed.request(method, path, json=body, headers=headers).status_code

        assert call({}) == 401, path
        assert call(bearer(EMBED_ONLY_KEY)) == 403, path
        assert call(bearer(CLIENT_KEYS[0])) == 403, path
        assert call(bearer(WRITER_KEY)) in {200, 201, 202}, path


def test_a_key_without_the_scope_is_told_which_one(keyed: TestClient) -> None:
    refused = keyed.post("/v1/collections/any/search", json={"query": "x"}, headers=bearer(EMBED_ONLY_KEY))
    assert refused.status_code == 403 and "'search' scope" in refused.json()["error"]["message"]
    assert (
        keyed.post("/v1/embeddings", json={"input": "x", "model": "tiny"}, headers=bearer(EMBED_ONLY_KEY)).status_code
        == 200
    )


def test_by_default_anonymous_callers_cannot_write(settings: Settings) -> None:
    default = settings.model_copy(update={"allow_anonymous_writes": False})
    with TestClient(create_app(default)) as client:
        for method, path, body in WRITE_ROUTES:
            refused = client.request(method, path, json=body)
            assert refused.status_code == 403, path
            assert refused.json()["error"]["code"] == "write_scope_required"
            assert "EMBEDSERVE_ALLOW_ANONYMOUS_WRITES" in refused.json()["error"]["message"]
        assert client.get("/v1/collections").status_code == 200  # reading stays open without keys
    allowed = settings.model_copy(update={"allow_anonymous_writes": True})
    with TestClient(create_app(allowed)) as client:
        assert client.put("/v1/collections/anonymous", json={"model": "tiny@1"}).status_code in {200, 201}
        assert client.delete("/v1/collections/anonymous").status_code == 200


def test_keys_come_from_the_environment_as_strings_or_scoped_objects(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMBEDSERVE_API_KEYS", '["plain", {"key": "w", "scopes": ["write", "search"]}]')
    plain, writer = Settings().api_keys
    assert plain.key.get_secret_value() == "plain" and plain.scopes == {"embed", "search"}
    assert writer.scopes == {"write", "search"}


def test_readiness_detail_is_for_the_admin_scope_when_keys_are_set(keyed: TestClient, client: TestClient) -> None:
    anyone = keyed.get("/readyz")
    assert anyone.status_code == 200 and anyone.json() == {"ready": True}  # no versions, reasons or paths
    assert keyed.get("/readyz", headers=bearer(CLIENT_KEYS[0])).json() == {"ready": True}
    detail = keyed.get("/readyz", headers=bearer(ADMIN_KEY)).json()
    assert detail["ready"] and {v["version"] for v in detail["versions"] if v["model"] == "tiny"} == {1, 2}
    assert "versions" in client.get("/readyz").json()  # no key configured at all: nothing to hide it from
