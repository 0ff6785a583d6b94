"""The evaluation report: one self-contained HTML file and a Markdown twin, from a list of sections.

The HTML embeds its figures as base64 PNG data URIs and its CSS inline, needs no JavaScript and
loads nothing from anywhere, so it can be mailed or archived as one file. All text is HTML-escaped.
The Markdown links the figures by path relative to the report.
"""

from __future__ import annotations

import base64
import html
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from cxrfusion.atomic import write_atomic

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MISSING = "n/a"

CSS = """
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1b1b1b;
       background: #fff; margin: 0; }
main { max-width: 1100px; margin: 0 auto; padding: 24px 32px 48px; }
h1 { font-size: 26px; border-bottom: 3px solid #0072B2; padding-bottom: 8px; }
h2 { font-size: 20px; margin-top: 36px; color: #0b3d62; }
nav ol { columns: 2; padding-left: 20px; }
nav a, nav a:visited { color: #0072B2; }
table { border-collapse: collapse; margin: 12px 0; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #c8c8c8; padding: 4px 10px; text-align: right; }
th { background: #e8f1f8; }
td:first-child, th:first-child { text-align: left; }
tbody tr:nth-child(even) { background: #f7f7f7; }
figure { margin: 16px 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #e0e0e0; }
figcaption { font-size: 13px; color: #555; }
pre { background: #f4f4f4; border: 1px solid #ddd; padding: 12px; overflow-x: auto;
      font-size: 13px; }
footer { margin-top: 48px; font-size: 12px; color: #777; }
"""


@dataclass(frozen=True)
class Section:
    """One report section: a heading and any of text, table, figure and preformatted text.

    They are rendered in that order. Text is plain: paragraphs separated by blank lines, and lines
    starting with "- " form a bullet list.

    Args:
        heading: section title.
        text: explanatory text.
        table: rendered with its index as the first column; floats as 0.123, NaN as "n/a".
        figure: a PNG file (embedded in HTML, linked from Markdown).
        caption: caption of the figure or table.
        code: preformatted text, e.g. the run config as YAML.
    """

    heading: str
    text: str = ""
    table: pd.DataFrame | None = None
    figure: Path | None = None
    caption: str = ""
    code: str | None = None


def _cell(value: object) -> str:
    """Text of one table cell: floats to 3 decimals, missing values as n/a."""
    if value is None or (isinstance(value, float | np.floating) and np.isnan(value)):
        return MISSING
    if isinstance(value, float | np.floating):
        return f"{value:.3f}"
    return str(value)


def _blocks(text: str) -> list[tuple[str, list[str]]]:
    """Split plain text into ("p", [paragraph]) and ("ul", items) blocks."""
    blocks = []
    for chunk in re.split(r"\n\s*\n", text.strip()):
        lines = [line.strip() for line in chunk.splitlines() if line.strip()]
        if lines and all(line.startswith("- ") for line in lines):
            blocks.append(("ul", [line[2:] for line in lines]))
        elif lines:
            blocks.append(("p", [" ".join(lines)]))
    return blocks


def _anchor(index: int) -> str:
    return f"section-{index + 1}"


def _png_data_uri(path: Path) -> str:
    """The figure as a data URI; only PNG is accepted, so every embedded image is one format."""
    data = Path(path).read_bytes()
    if not data.startswith(PNG_SIGNATURE):
        raise ValueError(f"{path}: report figures must be PNG files")
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _html_table(table: pd.DataFrame) -> str:
    esc = html.escape
    head = "".join(f"<th>{esc(str(c))}</th>" for c in [table.index.name or "", *table.columns])
    rows = "".join(
        "<tr>" + "".join(f"<td>{esc(_cell(v))}</td>" for v in row) + "</tr>"
        for row in table.itertuples(name=None)
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>"


def _html_section(index: int, section: Section) -> str:
    esc = html.escape
    parts = [f'<section id="{_anchor(index)}"><h2>{esc(section.heading)}</h2>']
    for kind, items in _blocks(section.text):
        if kind == "ul":
            parts.append("<ul>" + "".join(f"<li>{esc(item)}</li>" for item in items) + "</ul>")
        else:
            parts.append(f"<p>{esc(items[0])}</p>")
    if section.table is not None:
        parts.append(_html_table(section.table))
    if section.figure is not None:
        alt = esc(section.caption or section.heading)
        parts.append(f'<figure><img src="{_png_data_uri(section.figure)}" alt="{alt}">')
        parts.append(f"<figcaption>{esc(section.caption)}</figcaption></figure>")
    elif section.caption:
        parts.append(f"<p><em>{esc(section.caption)}</em></p>")
    if section.code is not None:
        parts.append(f"<pre>{esc(section.code)}</pre>")
    parts.append("</section>")
    return "\n".join(parts)


def render_html(title: str, sections: Sequence[Section]) -> str:
    """The complete self-contained HTML page: title, table of contents, sections."""
    esc = html.escape
    links = "".join(
        f'<li><a href="#{_anchor(i)}">{esc(s.heading)}</a></li>' for i, s in enumerate(sections)
    )
    toc = f"<nav><ol>{links}</ol></nav>\n" if len(sections) > 1 else ""
    body = "\n".join(_html_section(i, s) for i, s in enumerate(sections))
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{esc(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n"
        f"<h1>{esc(title)}</h1>\n{toc}{body}\n"
        "<footer>Generated by cxrfusion.</footer>\n</main>\n</body>\n</html>\n"
    )


def _md_escape(text: str) -> str:
    """Cell text safe inside a Markdown table row."""
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(table: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table with the index as first column."""
    header = [table.index.name or "", *map(str, table.columns)]
    lines = [
        "| " + " | ".join(map(_md_escape, header)) + " |",
        "|" + "|".join([":---"] + ["---:"] * len(table.columns)) + "|",
    ]
    for row in table.itertuples(name=None):
        cells = [_md_escape(_cell(v)) for v in row]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_markdown(title: str, sections: Sequence[Section], base: Path) -> str:
    """The Markdown twin of the report; figure links are relative to the folder `base`."""
    parts = [f"# {title}"]
    for section in sections:
        parts.append(f"## {section.heading}")
        parts.extend(
            "\n".join(f"- {item}" for item in items) if kind == "ul" else items[0]
            for kind, items in _blocks(section.text)
        )
        if section.table is not None:
            parts.append(markdown_table(section.table))
        if section.figure is not None:
            link = Path(os.path.relpath(Path(section.figure).resolve(), Path(base).resolve()))
            parts.append(f"![{section.caption or section.heading}]({link.as_posix()})")
        if section.caption:
            parts.append(f"*{section.caption}*")
        if section.code is not None:
            parts.append(f"```\n{section.code.rstrip()}\n```")
    return "\n\n".join(parts) + "\n"


def write_report(
    out_dir: Path, title: str, sections: Sequence[Section], stem: str = "report"
) -> tuple[Path, Path]:
    """Write `<stem>.html` (self-contained) and `<stem>.md` into `out_dir`, atomically.

    Args:
        out_dir: folder of the report, created if missing; usually the evaluation folder, which
            also holds the figures.
        title: page title and top heading.
        sections: the report's sections, in order.
        stem: file name without suffix.

    Returns:
        (html_path, markdown_path).
    """
    out_dir = Path(out_dir)
    html_path = write_atomic(out_dir / f"{stem}.html", render_html(title, sections))
    md_path = write_atomic(out_dir / f"{stem}.md", render_markdown(title, sections, out_dir))
    return html_path, md_path


def auc_table(summary: Mapping) -> pd.DataFrame:
    """Per-class and macro AUC with CI and counts from an `auc_summary` dict (JSON nulls allowed).

    Returns:
        DataFrame indexed by pathology (then "Macro") with columns AUC, "95 % CI" (text),
        positives, negatives; the CI column is named after the summary's level.
    """
    level = f"{100 * summary['level']:g} % CI"

    def row(entry: Mapping) -> dict:
        low, high = entry.get("ci_low"), entry.get("ci_high")
        ci = MISSING if low is None or high is None else f"{low:.3f} - {high:.3f}"
        auc = entry.get("auc")
        return {"AUC": np.nan if auc is None else auc, level: ci}

    table = pd.DataFrame.from_dict(
        {label: row(entry) for label, entry in summary["classes"].items()}, orient="index"
    )
    table["positives"] = [entry["positives"] for entry in summary["classes"].values()]
    table["negatives"] = [entry["negatives"] for entry in summary["classes"].values()]
    table.loc["Macro"] = [*row(summary["macro"]).values(), "", ""]
    table.index.name = "pathology"
    return table


def calibration_table(
    before: Mapping[str, float], after: Mapping[str, float] | None = None
) -> pd.DataFrame:
    """Calibration metrics (e.g. ECE, Brier, NLL) before and, if given, after temperature scaling.

    Args:
        before: metric name -> value of the uncalibrated probabilities.
        after: the same names after temperature scaling, or None.
    """
    columns = {"before": dict(before)}
    if after is not None:
        columns["after temperature scaling"] = dict(after)
    table = pd.DataFrame(columns)
    table.index.name = "metric"
    return table
