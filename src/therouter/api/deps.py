"""Annotated dependency aliases: services, the caller's key, the admin check."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from therouter.auth import admin_ok
from therouter.errors import AuthenticationFailed
from therouter.keys import KeyRecord
from therouter.services import Services


async def get_services(request: Request) -> Services:
    """Async on purpose: FastAPI runs plain `def` dependencies in a thread pool, a costly hop per request."""
    return request.app.state.services  # type: ignore[no-any-return]


async def get_key(request: Request) -> KeyRecord:
    services: Services = request.app.state.services
    return await services.auth.authenticate(request.headers.get("authorization"))


async def require_admin(request: Request) -> None:
    services: Services = request.app.state.services
    secret = services.settings.admin_key.get_secret_value() if services.settings.admin_key else None
    if not admin_ok(secret, request.headers.get("authorization")):
        raise AuthenticationFailed("Admin endpoints need 'Authorization: Bearer <THEROUTER_ADMIN_KEY>'.",
                                   code="invalid_admin_key")


ServicesDep = Annotated[Services, Depends(get_services)]
KeyDep = Annotated[KeyRecord, Depends(get_key)]
AdminDep = Depends(require_admin)
