"""An APIRoute that publishes the roles each route admits as `x-roles` in OpenAPI, and routes no
site-scoped token may use as `x-whole-study`; and that can answer a hot route's usual request by a
lean handler of its own (see `lean`)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response

LeanHandler = Callable[[Request], Awaitable[Response | None]]
_LEAN = "cohort_lean"
Endpoint = TypeVar("Endpoint", bound=Callable[..., Any])


def lean(handler: LeanHandler) -> Callable[[Endpoint], Endpoint]:
    """Give an endpoint a lean handler for its usual request.

    FastAPI's request handling (solving the dependency graph, parsing and validating the body, then
    serialising) costs a hot route more than its own work. `handler` does the same steps directly
    for the request it recognises as usual, and returns None for anything else *before it has done
    any work*: the declared endpoint then handles the request as if the handler were not there, so
    every error (and the OpenAPI document) is the declared route's. The request body stays cached on
    the request, so the declared route reads it again at no cost. Guards (middleware) and exception
    handlers apply to both alike.
    """

    def mark(endpoint: Endpoint) -> Endpoint:
        setattr(endpoint, _LEAN, handler)
        return endpoint

    return mark


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

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        declared = super().get_route_handler()
        fast: LeanHandler | None = getattr(self.endpoint, _LEAN, None)
        if fast is None:
            return declared

        async def handle(request: Request) -> Response:
            answered = await fast(request)
            return answered if answered is not None else await declared(request)

        return handle
