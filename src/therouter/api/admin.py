"""/admin: operator endpoints, behind THEROUTER_ADMIN_KEY."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(prefix="/admin")
