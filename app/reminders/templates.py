"""Email templates per study, in a sandboxed Jinja2 so coordinators can edit them safely."""

from __future__ import annotations

from typing import Any

from jinja2 import StrictUndefined, TemplateError
from jinja2.sandbox import SandboxedEnvironment

from app.core.errors import Invalid

DEFAULT_SUBJECT = (
    "{% if kind == 'invitation' %}{{ study_name }}: your {{ wave_label }} survey is open"
    "{% elif kind == 'final' %}Last reminder: your {{ wave_label }} survey closes {{ close_date }}"
    "{% else %}Reminder: your {{ wave_label }} survey{% endif %}"
)
DEFAULT_BODY = """Hello{% if first_name %} {{ first_name }}{% endif %},

{% if kind == 'invitation' -%}
Your {{ wave_label }} survey for {{ study_name }} is now open.
{%- elif kind == 'final' -%}
This is the last reminder: your {{ wave_label }} survey for {{ study_name }} closes soon.
{%- else -%}
A reminder that your {{ wave_label }} survey for {{ study_name }} is waiting for you.
{%- endif %}

Please complete it by {{ close_date }}:
{{ survey_link }}

Thank you for taking part.
"""

VARIABLES = ("first_name", "study_name", "wave_label", "close_date", "survey_link", "kind")
SAMPLE = {"first_name": "Ana", "study_name": "PAL replication", "wave_label": "6-month follow-up",
          "close_date": "Friday 3 September 2027", "survey_link": "https://survey.example/s/TOKEN",
          "kind": "reminder_1"}

_env = SandboxedEnvironment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True)


def render(subject: str, body: str, values: dict[str, Any]) -> tuple[str, str]:
    rendered_subject = _env.from_string(subject).render(values).strip().replace("\n", " ")
    return rendered_subject, _env.from_string(body).render(values)


def validate(subject: str, body: str) -> None:
    errors = []
    for field, source in (("subject", subject), ("body", body)):
        try:
            for kind in ("invitation", "reminder_1", "final"):
                _env.from_string(source).render({**SAMPLE, "kind": kind})
        except TemplateError as exc:
            errors.append({"loc": [field], "code": "template",
                           "message": f"{exc} (variables: {', '.join(VARIABLES)})"})
    if errors:
        raise Invalid("the template does not render", errors=errors)
