"""The reports as data: a title, a summary list and sections of tables and figures, rendered by templates.

A run's report and a sweep's report are both a `Document`; `templates/document.md.j2` and
`templates/document.html.j2` (jinja2, which Prefect brings) render either, so the two reports
share one look and one escaping rule (HTML escapes every cell; Markdown keeps them as written).
The Prefect artifact of a report is the same document cut after a section (`Document.until`),
rendered again: never a Markdown file split on a heading's text.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2

TEMPLATES = Path(__file__).parent / "templates"  # package data (pyproject.toml)


@dataclass(frozen=True)
class Section:
    """A heading, then a table (when `header` is given) and the figure named `figure` (when given)."""

    title: str
    header: tuple[str, ...] = ()
    rows: list[tuple[Any, ...]] = field(default_factory=list)
    figure: str | None = None
    level: int = 2


@dataclass(frozen=True)
class Document:
    title: str
    summary: list[tuple[str, Any]]
    sections: list[Section]

    def until(self, title: str) -> Document:
        """The document up to the section titled `title`, which is left out (a report's artifact)."""
        titles = [s.title for s in self.sections]
        return dataclasses.replace(self, sections=self.sections[: titles.index(title)])


@functools.cache
def _environment(fmt: str) -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=fmt == "html",
        undefined=jinja2.StrictUndefined,  # a figure the document names but nobody drew fails here
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def render(document: Document, fmt: str, images: dict[str, str]) -> str:
    """`document` as Markdown (`md`) or a self-contained page (`html`); `images`: figure name -> src."""
    return _environment(fmt).get_template(f"document.{fmt}.j2").render(doc=document, images=images)
