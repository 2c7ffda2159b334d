"""The checked-in OpenAPI document (openapi/openapi.json) is generated from the code here."""

from __future__ import annotations

import json
from typing import Any

from app.core.settings import Settings


def render_document() -> dict[str, Any]:
    from app.main import create_app

    # Built from defaults, not the environment: the document must not vary with local settings.
    app = create_app(Settings.model_construct())
    return app.openapi()


def render() -> str:
    return json.dumps(render_document(), indent=2, ensure_ascii=False) + "\n"
