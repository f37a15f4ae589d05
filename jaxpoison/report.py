"""A run folder's report, written once as blocks and rendered to Markdown and to self-contained HTML, and the
small writers every report shares (:func:`to_json`, the CI text).

No Markdown library is needed: a report is a list of blocks (heading, paragraph, table, figure, code), each
rendered by both writers. The HTML embeds its figures (base64 PNG) so it can be mailed as one file; the Markdown
links them relative to the run folder.
"""
from __future__ import annotations

import base64
import csv
import dataclasses
import html
import math
import pathlib
import re
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np


@dataclass
class Doc:
    title: str
    blocks: list = field(default_factory=list)

    def h(self, text: str, level: int = 2) -> "Doc":
        self.blocks.append(("h", level, text))
        return self

    def p(self, text: str) -> "Doc":
        self.blocks.append(("p", text))
        return self

    def bullets(self, items: Sequence[str]) -> "Doc":
        self.blocks.append(("ul", list(items)))
        return self

    def table(self, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> "Doc":
        self.blocks.append(("table", list(header), [[fmt(c) for c in r] for r in rows]))
        return self

    def figure(self, path: str, caption: str) -> "Doc":
        self.blocks.append(("fig", path, caption))
        return self

    def code(self, text: str) -> "Doc":
        self.blocks.append(("code", text))
        return self

    def markdown(self) -> str:
        out = [f"# {self.title}", ""]
        for b in self.blocks:
            kind = b[0]
            if kind == "h":
                out += ["#" * b[1] + " " + b[2], ""]
            elif kind == "p":
                out += [b[1], ""]
            elif kind == "ul":
                out += [f"- {x}" for x in b[1]] + [""]
            elif kind == "table":
                out += ["| " + " | ".join(b[1]) + " |", "|" + "---|" * len(b[1])]
                out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in b[2]] + [""]
            elif kind == "fig":
                out += [f"![{b[2]}]({b[1]})", "", f"*{b[2]}*", ""]
            elif kind == "code":
                out += ["```", b[1], "```", ""]
        return "\n".join(out)

    def html(self, root: pathlib.Path) -> str:
        body = [f"<h1>{html.escape(self.title)}</h1>"]
        for b in self.blocks:
            kind = b[0]
            if kind == "h":
                body.append(f"<h{b[1]}>{_inline(b[2])}</h{b[1]}>")
            elif kind == "p":
                body.append(f"<p>{_inline(b[1])}</p>")
            elif kind == "ul":
                body.append("<ul>" + "".join(f"<li>{_inline(x)}</li>" for x in b[1]) + "</ul>")
            elif kind == "table":
                head = "".join(f"<th>{_inline(c)}</th>" for c in b[1])
                rows = "".join("<tr>" + "".join(f"<td>{_inline(str(c))}</td>" for c in r) + "</tr>" for r in b[2])
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
            elif kind == "fig":
                f = root / b[1]
                src = ("data:image/png;base64," + base64.b64encode(f.read_bytes()).decode()) if f.exists() else b[1]
                body.append(f'<figure><img src="{src}" alt="{html.escape(b[2])}"><figcaption>{_inline(b[2])}'
                            f"</figcaption></figure>")
            elif kind == "code":
                body.append(f"<pre>{html.escape(b[1])}</pre>")
        style = ("body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;"
                 "line-height:1.45}table{border-collapse:collapse;margin:1em 0;font-size:90%}"
                 "td,th{border:1px solid #ccc;padding:3px 7px;text-align:left;vertical-align:top}"
                 "th{background:#f3f3f3}img{max-width:100%}figcaption{font-style:italic;color:#555}"
                 "pre{background:#f6f6f6;padding:.7em;overflow-x:auto}code{background:#f3f3f3}")
        return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
                f"<style>{style}</style></head><body>{''.join(body)}</body></html>")

    def write(self, root: pathlib.Path, stem: str = "report") -> tuple:
        md, ht = root / f"{stem}.md", root / f"{stem}.html"
        md.write_text(self.markdown(), encoding="utf-8")
        ht.write_text(self.html(root), encoding="utf-8")
        return md, ht


def _inline(text: str) -> str:
    """Escape, then the two Markdown inline forms the reports use: **bold** and `code`."""
    t = html.escape(str(text))
    t = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", t)
    return re.sub(r"`(.+?)`", r"<code>\1</code>", t)


def fmt(x: Any, digits: int = 3) -> str:
    if isinstance(x, bool) or x is None:
        return "" if x is None else str(x)
    if isinstance(x, (int,)) and not isinstance(x, bool):
        return str(x)
    try:
        f = float(x)
    except (TypeError, ValueError):
        return str(x)
    if math.isnan(f):
        return "–"
    return f"{f:.{digits}f}"


def pct(x, digits: int = 0) -> str:
    """A share as a percentage, '41 %' ('–' for None / NaN)."""
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.{digits}f} %"


def pct_ci_text(mean, low, high, digits: int = 0) -> str:
    """'41 % [30 %, 52 %]'."""
    return f"{pct(mean, digits)} [{pct(low, digits)}, {pct(high, digits)}]"


def ci_text(mean: float, low: float, high: float, digits: int = 2) -> str:
    """'0.41 [0.30, 0.52]'."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    lo = "–" if low is None or math.isnan(low) else f"{low:.{digits}f}"
    hi = "–" if high is None or math.isnan(high) else f"{high:.{digits}f}"
    return f"{mean:.{digits}f} [{lo}, {hi}]"


def to_json(x, strict: bool = False):
    """Dataclasses, tuples, numpy scalars and non-string keys made JSON-ready (dicts, lists, Python scalars).
    ``strict``: also numpy arrays (to lists), and NaN / infinities to None, for ``json.dumps(allow_nan=False)``."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: to_json(getattr(x, f.name), strict) for f in dataclasses.fields(x)}
    if isinstance(x, (list, tuple)):
        return [to_json(v, strict) for v in x]
    if isinstance(x, dict):
        return {str(k): to_json(v, strict) for k, v in x.items()}
    if strict and isinstance(x, np.ndarray):
        return to_json(x.tolist(), strict)
    if isinstance(x, np.generic):
        x = x.item()
    if strict and isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write_csv(path, rows: Sequence, header: Optional[Sequence[str]] = None, float_format: Optional[str] = None) -> None:
    """Rows to a UTF-8 CSV with a header line. Rows of dicts: the columns are ``header`` (other keys dropped) or
    else every key in the order first seen; a missing value or None is an empty cell. Rows of sequences need
    ``header``. ``float_format`` (e.g. ``.6g``) formats float cells; else they are written as ``str`` does."""
    rows = list(rows)
    dicts = bool(rows) and isinstance(rows[0], dict)
    if header is None:
        if rows and not dicts:
            raise ValueError("write_csv: rows of sequences need a header")
        header = list(dict.fromkeys(k for r in rows for k in r))
    cell = (lambda v: format(v, float_format) if isinstance(v, float) else v) if float_format else (lambda v: v)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in rows:
            w.writerow([cell(r.get(k)) for k in header] if dicts else [cell(v) for v in r])
