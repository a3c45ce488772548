"""The gateway as a release sees it: its release ledger, its versions, its rollouts and its collections, over
HTTP with the admin key. Plain dictionaries in, parsed JSON out; errors carry the gateway's own message."""

from typing import Any

import httpx

RETRYABLE = (502, 503, 504)


class GatewayError(Exception):
    def __init__(self, message: str, status: int | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class ReleaseGateway:
    def __init__(self, url: str, admin_key: str | None, timeout_s: float = 60.0) -> None:
        headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
        self._http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s)

    def close(self) -> None:
        self._http.close()

    # -- the release ledger -------------------------------------------------------------------
    def signals(self, model: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/admin/releases/signals/{model}")

    def claim(self, release_id: str, model: str, trigger: str) -> dict[str, Any]:
        body = {"release_id": release_id, "model": model, "trigger": trigger}
        return self._call("POST", "/v1/admin/releases", body)

    def report(self, release_id: str, **fields: Any) -> dict[str, Any]:
        body = {key: value for key, value in fields.items() if value is not None}
        return self._call("PATCH", f"/v1/admin/releases/{release_id}", body)

    # -- versions ------------------------------------------------------------------------------
    def reload_models(self) -> dict[str, Any]:
        return self._call("POST", "/v1/admin/models/reload")

    def version_card(self, model: str, version: int) -> dict[str, Any] | None:
        """What GET /v1/models says of ``model@version`` (state ready, refused or not_loaded), None if nothing."""
        for card in self._call("GET", "/v1/models")["data"]:
            if card["id"] == model:
                return next((v for v in card["versions"] if v["version"] == version), None)
        return None

    # -- rollouts ------------------------------------------------------------------------------
    def rollout(self, model: str) -> dict[str, Any] | None:
        try:
            return self._call("GET", f"/v1/rollouts/{model}")
        except GatewayError as error:
            if error.status == 404:
                return None
            raise

    def start_rollout(self, model: str, body: dict[str, Any]) -> dict[str, Any]:
        return self._call("PUT", f"/v1/rollouts/{model}", body)

    def rollback(self, model: str, reason: str) -> dict[str, Any]:
        return self._call("POST", f"/v1/rollouts/{model}/rollback", {"reason": reason})

    # -- collections ---------------------------------------------------------------------------
    def collections(self) -> list[dict[str, Any]]:
        data: list[dict[str, Any]] = self._call("GET", "/v1/collections")["data"]
        return data

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """The JSON object the gateway answered (every route the release calls answers one)."""
        try:
            response = self._http.request(method, path, json=body)
        except httpx.TransportError as error:
            raise GatewayError(f"cannot reach the gateway at {self._http.base_url}: {error}") from None
        if response.is_success:
            answer: dict[str, Any] = response.json()
            return answer
        try:
            problem = response.json()["error"]
            message, code = str(problem["message"]), problem.get("code")
        except (ValueError, KeyError, TypeError):
            message, code = response.text[:300], None
        raise GatewayError(f"{method} {path}: {response.status_code} {message}", response.status_code, code)
