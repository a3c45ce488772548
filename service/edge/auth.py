"""API keys, sent as ``Authorization: Bearer <key>``, and the scope each route needs.

Scopes: ``embed`` (/v1/embeddings, /v1/models, TEI's /embed, /tokenize, /info), ``search`` (reading
collections), ``write`` (creating, filling, deleting and re-indexing them), ``admin`` (/v1/rollouts, /readyz
detail). Client keys
(``EMBEDSERVE_API_KEYS``) carry the scopes they were given (embed and search when none are named); the
admin key (``EMBEDSERVE_ADMIN_API_KEY``) carries all. With client keys set, every data route needs a key:
401 without one or with an unknown one, 403 with a key that lacks the scope. Without client keys the read
routes are open, and writes are refused unless ``EMBEDSERVE_ALLOW_ANONYMOUS_WRITES`` says otherwise.
"""

import hashlib
import hmac
from collections.abc import Awaitable, Callable

from fastapi import Header, Request
from pydantic import SecretStr

from service.errors import Forbidden, Unauthorized
from service.settings import Scope, Settings

ALL_SCOPES: frozenset[Scope] = frozenset({"embed", "search", "write", "admin"})


def caller_identity(authorization: str | None) -> str | None:
    """Who is calling, as far as the bearer key tells (whether or not keys are checked): a digest of the key,
    never the key itself. A canary routes by it when the request names no routing key or user."""
    key = _bearer(authorization)
    return None if key is None else "api-key:" + hashlib.sha256(key.encode()).hexdigest()[:32]


def _bearer(authorization: str | None) -> str | None:
    scheme, _, key = (authorization or "").partition(" ")
    return key.strip() or None if scheme.lower() == "bearer" else None


def _scopes_of(key: str, settings: Settings) -> frozenset[Scope] | None:
    """The scopes ``key`` carries; None for a key nobody configured. Every configured key is compared, so the
    time taken says nothing about which one (if any) matched."""
    candidates: list[tuple[SecretStr, frozenset[Scope]]] = [(entry.key, entry.scopes) for entry in settings.api_keys]
    if settings.admin_api_key is not None:
        candidates.append((settings.admin_api_key, ALL_SCOPES))
    found: frozenset[Scope] | None = None
    for candidate, scopes in candidates:
        if hmac.compare_digest(key.encode(), candidate.get_secret_value().encode()):
            found = scopes if found is None else found | scopes
    return found


def may_see_internals(settings: Settings, authorization: str | None) -> bool:
    """Whether the caller may read what the gateway's operators read (/readyz detail: versions, reasons,
    paths): anyone when no key is configured at all, else a key with the admin scope."""
    if not settings.api_keys and settings.admin_api_key is None:
        return True
    key = _bearer(authorization)
    scopes = _scopes_of(key, settings) if key is not None else None
    return scopes is not None and "admin" in scopes


def require(scope: Scope) -> Callable[..., Awaitable[None]]:
    """The dependency of a route that needs ``scope``."""

    async def check(request: Request, authorization: str | None = Header(None, description="Bearer <API key>")) -> None:
        authorize(request.app.state.settings, scope, authorization)

    return check


def authorize(settings: Settings, scope: Scope, authorization: str | None) -> None:
    """Raise the 401 or 403 a caller sending ``authorization`` gets on a route that needs ``scope``
    (``require``'s check, for a route that reads its request itself)."""
    admin_possible = settings.admin_api_key is not None or any("admin" in k.scopes for k in settings.api_keys)
    if scope == "admin" and not admin_possible:
        raise Forbidden("admin API disabled: set EMBEDSERVE_ADMIN_API_KEY.")
    key = _bearer(authorization)
    scopes = _scopes_of(key, settings) if key is not None else None
    checked = bool(settings.api_keys) or scope == "admin"
    if scopes is None and checked:
        if key is None:
            raise Unauthorized("missing API key; send it as 'Authorization: Bearer <key>'.")
        raise Unauthorized("unknown API key; check the key you send as 'Authorization: Bearer <key>'.")
    if scopes is None:  # no client keys configured: an open deployment, and this caller is anonymous
        if scope == "write" and not settings.allow_anonymous_writes:
            raise Forbidden(
                "writing to collections needs an API key with the 'write' scope: set EMBEDSERVE_API_KEYS "
                '(e.g. [{"key": "...", "scopes": ["embed", "search", "write"]}]), or '
                "EMBEDSERVE_ALLOW_ANONYMOUS_WRITES=true on a network you trust.",
                code="write_scope_required",
            )
        return
    if scope not in scopes:
        if scope == "admin":
            raise Forbidden("this is a client API key; admin routes need the admin API key.")
        raise Forbidden(
            f"this API key lacks the '{scope}' scope this route needs; use a key that has it.",
            code="scope_missing",
        )
