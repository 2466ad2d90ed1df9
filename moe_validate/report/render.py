"""Renders a ReportModel into one self-contained HTML file (no network: CSS, script and data inline)."""

from __future__ import annotations

import base64
import hashlib
import json
import math
from pathlib import Path
from typing import Any, Optional, Union

from moe_validate.report.model import ReportModel, build_model
from moe_validate.results import ResultSet

__all__ = ["render_report", "render_html", "embed_json", "csp_hash"]

_HERE = Path(__file__).resolve().parent
_TEMPLATES = _HERE / "templates"
_STATIC = _HERE / "static"


def _finite(value: Any) -> Any:
    """JSON has no NaN/Inf: the page script reads these strings back as numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def embed_json(value: Any) -> str:
    """JSON that is safe inside <script type="application/json">: a script element's text is not
    entity-decoded, so HTML escaping would corrupt it; instead the characters that could end
    the element or open a comment (<, >, &) and the two JS line separators are \\u-escaped."""
    text = json.dumps(_finite(value), separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return (text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
            .replace("\u2028", "\\u2028").replace("\u2029", "\\u2029"))


def _environment():
    import jinja2  # imported here: `import moe_validate.report` stays cheap for the CLI

    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(_TEMPLATES)),
        autoescape=True,  # every {{ }} is HTML-escaped unless explicitly marked safe below
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    return env


def _static(name: str) -> str:
    text = (_STATIC / name).read_text(encoding="utf-8")
    if "</" + "script" in text.lower() or "</" + "style" in text.lower():
        raise RuntimeError(f"static/{name} must not contain a closing script/style tag")
    return text


def render_html(model: ReportModel) -> str:
    """The report page for an already built model."""
    import markupsafe

    if not isinstance(model, ReportModel):
        raise TypeError(f"model must be a ReportModel; got {type(model).__name__}")
    template = _environment().get_template("report.html.j2")
    css, js = _static("report.css"), _static("report.js")
    return template.render(
        m=model,
        css=markupsafe.Markup(css),
        js=markupsafe.Markup(js),
        css_hash=csp_hash(css),
        js_hash=csp_hash(js),
        data_json=markupsafe.Markup(embed_json(model.payload)),
    )


def csp_hash(text: str) -> str:
    """The CSP source expression allowing exactly this inline element's text (``'sha256-...'`` sans quotes)."""
    return "sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii")


def render_report(results: ResultSet, out_path: Union[str, Path], *, baseline: Optional[ResultSet] = None,
                  title: Optional[str] = None, history=None) -> Path:
    """Writes the HTML report of ``results`` (with a baseline comparison, a history section when given) to ``out_path``."""
    if not isinstance(out_path, (str, Path)):
        raise TypeError(f"out_path must be a str or Path; got {type(out_path).__name__}")
    out = Path(out_path)
    if out.is_dir():
        raise ValueError(f"out_path must be a file path, not a directory; got {out}")
    model = build_model(results, baseline=baseline, title=title, history=history)
    html = render_html(model)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(html, encoding="utf-8")
    tmp.replace(out)  # atomic: a browser never opens a half-written report
    return out
