"""The jinja2 environment of the HTML reports: templates under ``templates/``, autoescaping on, so every number,
name and sentence that reaches a page is escaped by the template and no renderer builds markup from strings."""

from __future__ import annotations

import base64
import io
import re
from functools import lru_cache

from jinja2 import Environment, PackageLoader, StrictUndefined, select_autoescape
from markupsafe import Markup, escape


def inline_markup(text: object) -> Markup:
    """Escape, then turn the two Markdown marks the report's sentences use into tags: **bold** and `code`."""
    safe = str(escape(str(text)))
    safe = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", safe)
    return Markup(re.sub(r"`(.+?)`", r"<code>\1</code>", safe))


@lru_cache(maxsize=1)
def environment() -> Environment:
    env = Environment(loader=PackageLoader("forecasting.reporting", "templates"),
                      autoescape=select_autoescape(default=True, default_for_string=True),
                      undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["inline"] = inline_markup
    return env


def render(template: str, **context) -> str:
    """Render one template; leading and trailing blank lines of the template are dropped."""
    return environment().get_template(template).render(**context).strip()


def png_data_uri(png: bytes) -> str:
    """A PNG as a ``data:`` URI, so a page carries its figures and can be mailed or archived as one file."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def figure_png(fig, **savefig) -> bytes:
    """A matplotlib figure as PNG bytes (white background)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", facecolor="white", **savefig)
    return buf.getvalue()
