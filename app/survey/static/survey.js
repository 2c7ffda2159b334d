// Shows and hides conditional questions as answers change. The page works without it: the
// server shows the questions that apply after each page. A hidden question's marker input is
// disabled, so the server knows which questions the participant saw.
(function () {
  "use strict";
  var form = document.getElementById("survey-form");
  if (!form) { return; }

  function valueOf(code) {
    var inputs = form.querySelectorAll('[name="' + code + '"]');
    if (!inputs.length) { return undefined; }
    var first = inputs[0];
    if (first.type === "checkbox") {
      var list = [];
      inputs.forEach(function (i) { if (i.checked) { list.push(i.value); } });
      return list;
    }
    if (first.type === "radio") {
      var chosen = null;
      inputs.forEach(function (i) { if (i.checked) { chosen = i.value; } });
      if (chosen === "true") { return true; }
      if (chosen === "false") { return false; }
      return chosen;
    }
    var text = first.value.trim();
    if (text === "") { return null; }
    var n = Number(text);
    return first.classList.contains("number") && !isNaN(n) ? n : text;
  }

  function holds(cond) {
    var value = valueOf(cond.item);
    if (cond.op === "exists") { return value !== null && value !== undefined && !(Array.isArray(value) && !value.length); }
    if (value === null || value === undefined) { return false; }
    var values = Array.isArray(value) ? value : [value];
    var expected = Array.isArray(cond.value) ? cond.value : [cond.value];
    var hit = values.some(function (v) { return expected.indexOf(v) >= 0; });
    switch (cond.op) {
      case "in": case "==": return hit;
      case "not_in": case "!=": return !hit;
      case ">": return value > cond.value;
      case ">=": return value >= cond.value;
      case "<": return value < cond.value;
      case "<=": return value <= cond.value;
    }
    return false;
  }

  function update() {
    form.querySelectorAll("[data-when]").forEach(function (el) {
      var show = holds(JSON.parse(el.getAttribute("data-when")));
      el.hidden = !show;
      var marker = el.querySelector('input[name="shown"]');
      if (marker) { marker.disabled = !show; }
    });
  }

  form.addEventListener("change", update);
  form.addEventListener("input", update);
  update();
  var summary = document.getElementById("error-summary");
  if (summary) { summary.focus(); }
})();
