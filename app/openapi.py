"""The checked-in OpenAPI document (openapi/openapi.json) is generated from the code here."""

from __future__ import annotations

import json

from app.core.settings import Settings


def render() -> str:
    from app.main import create_app

    # Built from defaults, not the environment: the document must not vary with local settings.
    app = create_app(Settings.model_construct())
    return json.dumps(app.openapi(), indent=2, ensure_ascii=False) + "\n"
