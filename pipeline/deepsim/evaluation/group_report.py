"""A study's quality-control report: one self-contained HTML file (images inlined as base64 PNG; opens offline).

Content: a metrics table (one row per subject: the metrics of :mod:`deepsim.evaluation.dice` and
:mod:`deepsim.evaluation.jacobian` as the participant level computed them), outliers flagged by a robust z-score,
one overlay figure per subject (the template's contours over the subject warped into the template, three planes)
and the table of failed subjects.

Robust z-score of a value x among a metric's values X: ``z = (x − median(X)) / (1.4826 · MAD(X))``, MAD the median
absolute deviation (1.4826 · MAD estimates the standard deviation of normal data while ignoring the outliers
themselves); a subject is flagged for a metric where ``|z| > threshold`` (3.5, Iglewicz and Hoaglin's cut-off).
A metric whose MAD is 0 flags nothing (e.g. folding 0 % everywhere), nor does one with fewer than
:data:`MIN_SUBJECTS` finite values (a median and MAD of three values say little).
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence

import numpy as np

__all__ = ["robust_z", "flag_outliers", "overlay_png", "render_report", "OUTLIER_THRESHOLD", "MIN_SUBJECTS"]

OUTLIER_THRESHOLD = 3.5
MIN_SUBJECTS = 5


def robust_z(values: Sequence[float]) -> np.ndarray:
    """Robust z-scores (module docstring) of ``values``; NaN where a value is NaN, 0 everywhere when MAD is 0."""
    x = np.asarray(values, dtype=np.float64)
    finite = x[np.isfinite(x)]
    if finite.size == 0:
        return np.full(x.shape, np.nan)
    median = np.median(finite)
    mad = np.median(np.abs(finite - median))
    if mad == 0:
        return np.where(np.isfinite(x), 0.0, np.nan)
    return (x - median) / (1.4826 * mad)


def flag_outliers(rows: list[dict], metrics: Sequence[str], threshold: float = OUTLIER_THRESHOLD) -> list[list[str]]:
    """Per row, the metrics whose robust z-score exceeds ``threshold`` in absolute value."""
    flags: list[list[str]] = [[] for _ in rows]
    for metric in metrics:
        values = [_number(row.get(metric)) for row in rows]
        if sum(math.isfinite(v) for v in values) < MIN_SUBJECTS:
            continue
        z = robust_z(values)
        for i, value in enumerate(z):
            if np.isfinite(value) and abs(value) > threshold:
                flags[i].append(f"{metric} (z {value:+.1f})")
    return flags


def _number(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def overlay_png(image: np.ndarray, template: np.ndarray, title: str, dpi: int = 80) -> bytes:
    """PNG of three orthogonal mid-planes of ``image`` (grey) with the contours of ``template`` (same grid, red)
    over it; arrays in RAS-like voxel order as written (axes 0, 1, 2)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    image = np.asarray(image, dtype=np.float32)
    template = np.asarray(template, dtype=np.float32)
    inside = template[template > 0]
    levels = sorted(set(np.quantile(inside, [0.3, 0.7]).tolist())) if inside.size else [0.5]
    hi = float(np.percentile(image, 99.5)) or 1.0
    fig = Figure(figsize=(9, 3.2), dpi=dpi)
    axes = fig.subplots(1, 3)
    for axis, ax in enumerate(axes):
        index = [slice(None)] * 3
        index[axis] = image.shape[axis] // 2
        ax.imshow(image[tuple(index)].T, origin="lower", cmap="gray", vmin=0, vmax=hi)
        ax.contour(template[tuple(index)].T, levels=levels, colors="red", linewidths=0.6)
        ax.set_axis_off()
    fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.9, wspace=0.02)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


_STYLE = """body{font-family:sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#eee;text-align:left}td.l{text-align:left}
tr.outlier td{background:#fde2e2}img{max-width:100%}figure{margin:1em 0}figcaption{font-size:90%}"""


def _cell(value) -> str:
    number = _number(value)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "<td>–</td>"
    if isinstance(value, str) or not math.isfinite(number):
        return f'<td class="l">{html.escape(str(value))}</td>'
    return f"<td>{number:.4g}</td>"


def render_report(title: str, rows: list[dict], metrics: Sequence[str], failures: list[dict],
                  figures: dict[str, bytes], notes: Sequence[str] = ()) -> str:
    """The report as one HTML string: ``rows`` (each with ``id`` and the ``metrics``), ``failures`` (``subject``,
    ``session``, ``t1w``, ``error``), ``figures`` (row id -> PNG bytes), free-text ``notes`` (paragraphs)."""
    flags = flag_outliers(rows, metrics)
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
    parts += [f"<p>{html.escape(note)}</p>" for note in notes]
    parts.append(f"<h2>Metrics ({len(rows)} registered, {len(failures)} failed)</h2>"
                 f"<p>Outliers: |robust z| &gt; {OUTLIER_THRESHOLD} (median and MAD of each metric; with at least "
                 f"{MIN_SUBJECTS} subjects).</p><table><tr>"
                 "<th>subject</th>" + "".join(f"<th>{html.escape(m)}</th>" for m in metrics) + "<th>outlier in</th></tr>")
    for row, flag in zip(rows, flags):
        css = ' class="outlier"' if flag else ""
        parts.append(f"<tr{css}><td class='l'><a href='#{html.escape(row['id'])}'>{html.escape(row['id'])}</a></td>"
                     + "".join(_cell(row.get(m)) for m in metrics)
                     + f"<td class='l'>{html.escape(', '.join(flag))}</td></tr>")
    parts.append("</table>")
    if failures:
        parts.append("<h2>Failures</h2><table><tr><th>subject</th><th>session</th><th>file</th><th>error</th></tr>")
        for f in failures:
            parts.append("<tr>" + "".join(f"<td class='l'>{html.escape(str(f.get(k) or ''))}</td>"
                                          for k in ("subject", "session", "t1w", "error")) + "</tr>")
        parts.append("</table>")
    parts.append("<h2>Overlays: template contours (red) over each subject in template space</h2>")
    for row in rows:
        png = figures.get(row["id"])
        if png is None:
            continue
        data = base64.b64encode(png).decode("ascii")
        parts.append(f"<figure id='{html.escape(row['id'])}'><img alt='{html.escape(row['id'])} overlay' "
                     f"src='data:image/png;base64,{data}'><figcaption>{html.escape(row['id'])}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)
