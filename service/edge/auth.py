"""API keys, sent as ``Authorization: Bearer <key>``: client keys for the data routes, one admin key for the rest.

Client keys (``EMBEDSERVE_API_KEYS``, optional) can never reach admin routes: those answer 401 without a key
or with an unknown one, and 403 with a client key. The admin key also opens the client routes.
"""

import hashlib
import hmac

from fastapi import Header, Request
from pydantic import SecretStr

from service.errors import Forbidden, Unauthorized
from service.settings import Settings


def _bearer(authorization: str | None) -> str | None:
    scheme, _, key = (authorization or "").partition(" ")
    return key.strip() or None if scheme.lower() == "bearer" else None


def caller_identity(authorization: str | None) -> str | None:
    """Who is calling, as far as the bearer key tells (whether or not keys are checked): a digest of the key,
    never the key itself. A canary routes by it when the request names no routing key or user."""
    key = _bearer(authorization)
    return None if key is None else "api-key:" + hashlib.sha256(key.encode()).hexdigest()[:32]


def _matches(key: str, candidates: list[SecretStr]) -> bool:
    # Every candidate is compared, so the time taken says nothing about which one (if any) matched.
    found = False
    for candidate in candidates:
        found |= hmac.compare_digest(key.encode(), candidate.get_secret_value().encode())
    return found


def _admin_keys(settings: Settings) -> list[SecretStr]:
    return [settings.admin_api_key] if settings.admin_api_key is not None else []


async def require_client(
    request: Request, authorization: str | None = Header(None, description="Bearer <API key>")
) -> None:
    """A client (or admin) key when ``EMBEDSERVE_API_KEYS`` is set; anyone otherwise."""
    settings: Settings = request.app.state.settings
    if not settings.api_keys:
        return
    key = _bearer(authorization)
    if key is None:
        raise Unauthorized("missing API key; send it as 'Authorization: Bearer <key>'.")
    if not _matches(key, [*settings.api_keys, *_admin_keys(settings)]):
        raise Unauthorized("unknown API key; check the key you send as 'Authorization: Bearer <key>'.")


async def require_admin(
    request: Request, authorization: str | None = Header(None, description="Bearer <admin API key>")
) -> None:
    """The admin key: 401 without a key or with an unknown one, 403 with a client key or no admin key set."""
    settings: Settings = request.app.state.settings
    if settings.admin_api_key is None:
        raise Forbidden("admin API disabled: set EMBEDSERVE_ADMIN_API_KEY.")
    key = _bearer(authorization)
    if key is None:
        raise Unauthorized("missing admin API key; send it as 'Authorization: Bearer <key>'.")
    if _matches(key, _admin_keys(settings)):
        return
    if _matches(key, settings.api_keys):
        raise Forbidden("this is a client API key; admin routes need the admin API key.")
    raise Unauthorized("unknown admin API key.")
