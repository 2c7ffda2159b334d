"""A study seen as a REDCap project: instruments are forms, waves are events of one arm.

Pure functions from the codebook (and stored answers) to REDCap's shapes, and back:
checkbox items expand to `code___option` columns, booleans are yesno (1/0), every form has
`<form>_complete` (0 incomplete, 1 unverified = our `partial`, 2 complete), and the record-id
field (`record_id`, the participant's external_id) comes first.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from app.instruments.codebook import Codebook
from app.redcap.logic import Schema

RECORD_ID = "record_id"
ARM = 1
MANAGED = ("redcap_survey_identifier", "redcap_data_access_group", "redcap_repeat_instrument",
           "redcap_repeat_instance")
COMPLETE_LABELS = {"0": "Incomplete", "1": "Unverified", "2": "Complete"}
OPERATORS = {"==": "=", "!=": "<>", ">": ">", ">=": ">=", "<": "<", "<=": "<="}


def event_name(wave: str) -> str:
    return f"{wave}_arm_{ARM}"


def wave_of(event: str) -> str | None:
    suffix = f"_arm_{ARM}"
    return event[: -len(suffix)] if event.endswith(suffix) else None


@dataclass(frozen=True)
class Field:
    name: str
    form: str
    type: str  # our item type
    label: str
    options: tuple[tuple[str, str], ...]
    required: bool
    waves: frozenset[str]
    doc: dict[str, Any]


class Project:
    """The REDCap view of one study's codebook."""

    def __init__(self, codebook: Codebook) -> None:
        self.codebook = codebook
        self.forms: list[tuple[str, str]] = [(i["key"], i["label"]) for i in codebook.document["instruments"]]
        self.fields: list[Field] = []
        for instrument in codebook.document["instruments"]:
            for item in instrument["items"]:
                self.fields.append(Field(
                    item["code"], instrument["key"], item["type"], item["label"],
                    tuple((o["code"], o["label"]) for o in item.get("options") or ()),
                    bool(item.get("required")), frozenset(item["waves"]), item))
        self.by_name = {f.name: f for f in self.fields}
        self.form_waves = {i["key"]: set(i["waves"]) | {w for it in i["items"] for w in it["waves"]}
                           for i in codebook.document["instruments"]}
        self.first_form = self.forms[0][0]

    # -- metadata ----------------------------------------------------------------------------------

    def metadata(self) -> list[dict[str, str]]:
        rows = [_meta(RECORD_ID, self.first_form, "text", "Record ID (participant external_id)")]
        for f in self.fields:
            row = _meta(f.name, f.form, _field_type(f.type), f.label)
            if f.options:
                row["select_choices_or_calculations"] = " | ".join(f"{c}, {label}" for c, label in f.options)
            if f.type in ("integer", "number", "date"):
                row["text_validation_type_or_show_slider_number"] = {"integer": "integer", "number": "number",
                                                                     "date": "date_ymd"}[f.type]
            for bound in ("min", "max"):
                if f.doc.get(bound) is not None:
                    row[f"text_validation_{bound}"] = _text(f.doc[bound])
            row["required_field"] = "y" if f.required else ""
            row["branching_logic"] = self.branching(f)
            row["field_note"] = f.doc.get("description") or ""
            rows.append(row)
        return rows

    def branching(self, f: Field) -> str:
        cond = f.doc.get("enable_when")
        if not cond:
            return ""
        source = self.by_name.get(cond["item"])
        op, value = cond["operator"], cond.get("value")
        if op == "exists":
            return f"[{cond['item']}] <> ''"
        values = value if isinstance(value, list) else [value]
        if op in ("in", "not_in"):
            joiner, compare = (" or ", "=") if op == "in" else (" and ", "<>")
            if source is not None and source.type == "multi_choice":
                return joiner.join(f"[{cond['item']}({v})] {compare} '1'" for v in values)
            return joiner.join(f"[{cond['item']}] {compare} '{_raw(v)}'" for v in values)
        return f"[{cond['item']}] {OPERATORS[op]} '{_raw(value)}'"

    def export_field_names(self, only: str | None = None) -> list[dict[str, str]]:
        out = [{"original_field_name": RECORD_ID, "choice_value": "", "export_field_name": RECORD_ID}]
        for f in self.fields:
            if f.type == "multi_choice":
                out += [{"original_field_name": f.name, "choice_value": c, "export_field_name": f"{f.name}___{c}"}
                        for c, _ in f.options]
            else:
                out.append({"original_field_name": f.name, "choice_value": "", "export_field_name": f.name})
        return [r for r in out if only is None or r["original_field_name"] == only]

    def events(self) -> list[dict[str, Any]]:
        return [{"event_name": w["label"], "arm_num": ARM, "unique_event_name": event_name(w["key"]),
                 "custom_event_label": "", "event_id": i + 1, "days_offset": w["offset_days"],
                 "offset_min": w["window_open_days"] - w["offset_days"],
                 "offset_max": w["window_close_days"] - w["offset_days"]}
                for i, w in enumerate(self.codebook.document["waves"])]

    def form_event_mapping(self) -> list[dict[str, Any]]:
        return [{"arm_num": ARM, "unique_event_name": event_name(w), "form": form}
                for w in self.codebook.wave_keys for form, _ in self.forms if w in self.form_waves[form]]

    # -- records -----------------------------------------------------------------------------------

    def columns(self, fields: list[Field], *, survey: bool = False) -> list[str]:
        """Columns of a flat export: each form's fields, then `<form>_complete` (`<form>_timestamp` first with
        survey fields, as REDCap puts it)."""
        out: list[str] = []
        forms_seen: list[str] = []
        for f in fields:
            if f.form not in forms_seen:
                if forms_seen:
                    out.append(f"{forms_seen[-1]}_complete")
                forms_seen.append(f.form)
                if survey:
                    out.append(f"{f.form}_timestamp")
            out += [f"{f.name}___{c}" for c, _ in f.options] if f.type == "multi_choice" else [f.name]
        if forms_seen:
            out.append(f"{forms_seen[-1]}_complete")
        return out

    def header_labels(self) -> dict[str, str]:
        """Column -> REDCap's label header (`rawOrLabelHeaders=label`)."""
        out = {RECORD_ID: "Record ID", "redcap_event_name": "Event Name",
               "redcap_data_access_group": "Data Access Group", "redcap_survey_identifier": "Survey Identifier"}
        for form, _ in self.forms:
            out[f"{form}_complete"] = "Complete?"
            out[f"{form}_timestamp"] = "Survey Timestamp"
        for f in self.fields:
            if f.type == "multi_choice":
                out.update({f"{f.name}___{c}": f"{f.label} (choice={label})" for c, label in f.options})
            else:
                out[f.name] = f.label
        return out

    def form_statuses(self, wave: str, answers: dict[str, Any], status: str,
                      completed: Iterable[str]) -> dict[str, str]:
        """`<form>_complete` of each form of the event: 2 complete (the response, or that instrument, contract
        section 5), 1 started (unverified), 0 untouched."""
        done = set(completed)
        out: dict[str, str] = {}
        for form, _ in self.forms:
            if wave not in self.form_waves[form]:
                continue
            if status == "complete" or form in done:
                out[form] = "2"
            else:
                touched = any(answers.get(f.name) is not None for f in self.fields if f.form == form)
                out[form] = "1" if touched else "0"
        return out

    def logic_schema(self) -> Schema:
        names: dict[str, tuple[str, ...] | None] = {RECORD_ID: None, "redcap_event_name": None}
        for f in self.fields:
            names[f.name] = tuple(c for c, _ in f.options) if f.type == "multi_choice" else None
        for form, _ in self.forms:
            names[f"{form}_complete"] = None
        return Schema(names, {event_name(w) for w in self.codebook.wave_keys})

    def flat_row(self, record: str, wave: str, answers: dict[str, Any], statuses: dict[str, str],
                 fields: list[Field], labels: bool, *, checkbox_labels: bool = False,
                 survey: dict[str, str] | None = None) -> dict[str, str]:
        """One record-event row. `statuses` is form -> 0/1/2 for the forms of this event; `survey`, when
        survey fields are exported, form -> its completion timestamp."""
        row = {RECORD_ID: record, "redcap_event_name": event_name(wave)}
        for f in fields:
            value = answers.get(f.name)
            if f.type == "multi_choice":
                chosen = set(value or []) if isinstance(value, list) else set()
                for code, label in f.options:
                    row[f"{f.name}___{code}"] = _checkbox(code in chosen, value is not None, label, labels,
                                                          checkbox_labels)
            else:
                row[f.name] = _export_value(f, value, labels)
            key = f"{f.form}_complete"
            if key not in row:
                status = statuses.get(f.form, "")
                row[key] = COMPLETE_LABELS[status] if labels and status else status
            if survey is not None:
                row[f"{f.form}_timestamp"] = survey.get(f.form, "")
        ordered = {RECORD_ID: row[RECORD_ID], "redcap_event_name": row["redcap_event_name"]}
        for column in self.columns(fields, survey=survey is not None):
            ordered[column] = row.get(column, "")
        return ordered

    def answers_from(self, row: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """One imported record-event row -> (answers, problems). Blank cells are not answers."""
        answers: dict[str, Any] = {}
        problems: list[str] = []
        checkboxes: dict[str, list[str]] = {}
        touched_boxes: set[str] = set()
        for column, raw in row.items():
            if column in (RECORD_ID, "redcap_event_name") or (column.endswith("_complete")
                                                                and column not in self.by_name):
                continue
            text = "" if raw is None else str(raw).strip()
            if column in MANAGED or (column.endswith("_timestamp") and column.removesuffix("_timestamp")
                                     in self.form_waves and column not in self.by_name):
                if text:
                    problems.append(f"{column}: set by the service, not imported (leave it blank)")
                continue
            if "___" in column:
                name, _, code = column.partition("___")
                f = self.by_name.get(name)
                if f is None or f.type != "multi_choice" or code not in {c for c, _ in f.options}:
                    problems.append(f"{column}: not a checkbox option of this project")
                    continue
                if text == "":
                    continue
                touched_boxes.add(name)
                if text not in ("0", "1"):
                    problems.append(f"{column}: checkbox values are 0 or 1, not {text!r}")
                elif text == "1":
                    checkboxes.setdefault(name, []).append(code)
                continue
            f = self.by_name.get(column)
            if f is None:
                problems.append(f"{column}: no such field in this project")
                continue
            if text == "":
                continue
            try:
                answers[column] = _import_value(f, text)
            except ValueError as exc:
                problems.append(f"{column}: {exc}")
        for name in touched_boxes:
            answers[name] = checkboxes.get(name, [])
        return answers, problems

    def complete_flags(self, row: dict[str, Any], wave: str) -> tuple[dict[str, str], list[str]]:
        """The `<form>_complete` cells of an imported row: form -> 0/1/2 (blank cells left out), and problems."""
        flags: dict[str, str] = {}
        problems: list[str] = []
        for column, raw in row.items():
            if not column.endswith("_complete") or column in self.by_name:
                continue
            form = column.removesuffix("_complete")
            value = "" if raw is None else str(raw).strip()
            if form not in self.form_waves:
                problems.append(f"{column}: {form!r} is not a form of this project")
            elif value == "":
                continue
            elif value not in ("0", "1", "2"):
                problems.append(f"{column}: a form status is 0 (incomplete), 1 (unverified) or 2 (complete), "
                                f"not {value!r}")
            elif wave not in self.form_waves[form]:
                problems.append(f"{column}: form {form!r} is not used at event {event_name(wave)}")
            else:
                flags[form] = value
        return flags, problems

    def forms_at(self, wave: str) -> list[str]:
        return [form for form, _ in self.forms if wave in self.form_waves[form]]


def _meta(name: str, form: str, field_type: str, label: str) -> dict[str, str]:
    return {"field_name": name, "form_name": form, "section_header": "", "field_type": field_type,
            "field_label": label, "select_choices_or_calculations": "", "field_note": "",
            "text_validation_type_or_show_slider_number": "", "text_validation_min": "", "text_validation_max": "",
            "identifier": "", "branching_logic": "", "required_field": "", "custom_alignment": "",
            "question_number": "", "matrix_group_name": "", "matrix_ranking": "", "field_annotation": ""}


def _field_type(kind: str) -> str:
    return {"single_choice": "radio", "multi_choice": "checkbox", "boolean": "yesno"}.get(kind, "text")


def _text(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _raw(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    return _text(value)


def _checkbox(checked: bool, answered: bool, label: str, labels: bool, checkbox_labels: bool) -> str:
    """REDCap's checkbox cell: 1/0 raw; "Checked"/"Unchecked" as labels, or the option's label and blank
    with exportCheckboxLabel. An item never answered is blank."""
    if not answered:
        return ""
    if not labels:
        return "1" if checked else "0"
    if checkbox_labels:
        return label if checked else ""
    return "Checked" if checked else "Unchecked"


def _export_value(f: Field, value: Any, labels: bool) -> str:
    if value is None:
        return ""
    if f.type == "boolean":
        return ("Yes" if value else "No") if labels else ("1" if value else "0")
    if f.type == "single_choice" and labels:
        return dict(f.options).get(str(value), str(value))
    return _text(value)


def _import_value(f: Field, text: str) -> Any:
    """REDCap sends text; the native API's types are strict, so convert only what is unambiguous."""
    if f.type == "boolean":
        if text not in ("0", "1"):
            raise ValueError(f"yes/no values are 1 or 0, not {text!r}")
        return text == "1"
    if f.type == "integer":
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{text!r} is not an integer") from None
    if f.type == "number":
        try:
            number = float(text)
        except ValueError:
            raise ValueError(f"{text!r} is not a number") from None
        return int(number) if number.is_integer() and "." not in text else number
    return text
