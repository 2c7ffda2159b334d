"""An APIRoute that publishes the roles each route admits as `x-roles` in OpenAPI, and routes no
site-scoped token may use as `x-whole-study`."""

from __future__ import annotations

from typing import Any

from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute


def _roles(dependant: Dependant) -> tuple[str, ...] | None:
    for dep in dependant.dependencies:
        roles = getattr(dep.call, "cohort_roles", None)
        if roles is not None:
            return tuple(roles)
        found = _roles(dep)
        if found is not None:
            return found
    return None


def _whole_study(dependant: Dependant) -> bool:
    return any(getattr(dep.call, "cohort_whole_study", False) or _whole_study(dep) for dep in dependant.dependencies)


class RoleRoute(APIRoute):
    def __init__(self, path: str, endpoint: Any, **kwargs: Any) -> None:
        super().__init__(path, endpoint, **kwargs)
        roles = _roles(self.dependant)
        if roles is not None:
            self.openapi_extra = {**(self.openapi_extra or {}), "x-roles": list(roles)}
        if _whole_study(self.dependant):  # a site-scoped token is refused (403)
            self.openapi_extra = {**(self.openapi_extra or {}), "x-whole-study": True}
