"""Email templates per study, in a sandboxed Jinja2 so coordinators can edit them safely.

The sandbox stops attribute tricks but not work without end (`{% for i in range(10**8) %}`,
`{{ 'x' * 10**9 }}`), so a template may use only a small, loop-free part of the language:
text, variables, `if`/`elif`/`else` with comparisons and `and`/`or`/`not`, string constants and
a few formatting filters. That is checked when a template is saved and again before each render.
"""

from __future__ import annotations

from typing import Any

from jinja2 import StrictUndefined, TemplateError, TemplateSyntaxError, nodes
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

_ALLOWED_NODES = (nodes.Template, nodes.Output, nodes.TemplateData, nodes.Name, nodes.Const, nodes.If,
                  nodes.Compare, nodes.Operand, nodes.Not, nodes.And, nodes.Or, nodes.Filter, nodes.CondExpr)
FILTERS = frozenset({"upper", "lower", "title", "capitalize", "trim", "default", "e", "escape"})
_MAX_LENGTH = 20_000


class UnsafeTemplate(TemplateError):
    pass


def _check(source: str) -> None:
    if len(source) > _MAX_LENGTH:
        raise UnsafeTemplate(f"a template is at most {_MAX_LENGTH} characters")
    for node in _env.parse(source).find_all(nodes.Node):
        if not isinstance(node, _ALLOWED_NODES):
            allowed = f"text, {{{{ variable }}}}, if/elif/else, filters {', '.join(sorted(FILTERS))}"
            raise UnsafeTemplate(f"{type(node).__name__.lower()} is not allowed in a message template "
                                 f"(allowed: {allowed})")
        if isinstance(node, nodes.Filter) and node.name not in FILTERS:
            raise UnsafeTemplate(f"the filter {node.name!r} is not allowed (allowed: {', '.join(sorted(FILTERS))})")
        if isinstance(node, nodes.Name) and node.name not in VARIABLES:
            raise UnsafeTemplate(f"unknown variable {node.name!r}")
        if isinstance(node, nodes.Const) and not isinstance(node.value, str | int | bool | None):
            raise UnsafeTemplate("only text, whole numbers and true/false may be written in a template")


def _render(source: str, values: dict[str, Any]) -> str:
    _check(source)
    return _env.from_string(source).render(values)


def render(subject: str, body: str, values: dict[str, Any]) -> tuple[str, str]:
    rendered_subject = _render(subject, values).strip()
    # a header value is one line: CR/LF from a template or a label would start a new header
    rendered_subject = " ".join(rendered_subject.split())
    return rendered_subject, _render(body, values)


def validate(subject: str, body: str) -> None:
    errors = []
    for field, source in (("subject", subject), ("body", body)):
        try:
            for kind in ("invitation", "reminder_1", "final"):
                _render(source, {**SAMPLE, "kind": kind})
        except TemplateSyntaxError as exc:
            errors.append({"loc": [field], "code": "template", "message": f"line {exc.lineno}: {exc.message}"})
        except TemplateError as exc:
            errors.append({"loc": [field], "code": "template",
                           "message": f"{exc} (variables: {', '.join(VARIABLES)})"})
    if errors:
        raise Invalid("the template does not render", errors=errors)
