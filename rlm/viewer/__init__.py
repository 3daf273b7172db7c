"""A trajectory as one self-contained HTML page: the run tree, totals, a timeline and search.

    from rlm.viewer import write_html
    write_html("runs/RUN.jsonl", "run.html")

The page has no external assets and makes no requests (its Content-Security-Policy forbids
them): styles, script and the run's data are inline. Nodes are drawn when opened, so runs
with thousands of events open at once.
"""

from __future__ import annotations

import html
import json
import os
from importlib import resources
from pathlib import Path

from rlm.trajectory import Trajectory, load
from rlm.viewer.model import page_data

__all__ = ["render_html", "write_html"]


def _asset(name: str) -> str:
    return resources.files("rlm.viewer").joinpath(name).read_text(encoding="utf-8")


def render_html(trajectory: Trajectory) -> str:
    """The page for a loaded trajectory, as a string."""
    data = json.dumps(page_data(trajectory), ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    # Inside <script> only "</" could end the element early; escaping <, > and & keeps the JSON
    # valid and inert (they occur only inside strings).
    data = data.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
    page = _asset("template.html")
    page = page.replace("/*CSS*/", _asset("viewer.css")).replace("/*JS*/", _asset("viewer.js"))
    page = page.replace("{{TITLE}}", html.escape(f"rlm run {trajectory.root.run_id}"))
    head, tail = page.split("{{DATA}}", 1)
    return head + data + tail


def write_html(source: str | os.PathLike | Trajectory, out: str | os.PathLike | None = None) -> Path:
    """Render a trajectory (a file path or a loaded one) to `out`, by default next to the file
    as `<run_id>.html`. Returns the path written."""
    trajectory = source if isinstance(source, Trajectory) else load(source)
    if out is None:
        if trajectory.path is None:
            raise ValueError("give `out` for a trajectory that was not loaded from a file")
        out = trajectory.path.with_suffix(".html")
    out = Path(out)
    out.write_text(render_html(trajectory), encoding="utf-8")
    return out
