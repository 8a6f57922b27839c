"""qa.html: one self-contained page (base64 thumbnails, inline JS, no network) to eyeball a batch.

One row per image: the input and attention overlays, each artifact's prediction and confidence,
the true label when known, and how many artifacts disagree with the original. Column headers sort.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.atomic import write_text


@dataclass
class GalleryRow:
    index: int
    name: str
    label: int | None
    thumbs: list[tuple[str, str]]  # (caption, data URI)
    preds: dict[str, tuple[int, float]]  # artifact -> (class, confidence)
    similarity: dict[str, float] = field(default_factory=dict)  # artifact -> attention similarity

    @property
    def disagreement(self) -> int:
        """Artifacts whose prediction differs from the first (the original)."""
        values = list(self.preds.values())
        return sum(1 for p in values[1:] if p[0] != values[0][0]) if values else 0

    @property
    def min_similarity(self) -> float:
        return min(self.similarity.values()) if self.similarity else 1.0


_SCRIPT = """
function sortBy(key, desc){const tb=document.querySelector('tbody');const rows=[...tb.rows];
rows.sort((a,b)=>{const x=parseFloat(a.dataset[key]),y=parseFloat(b.dataset[key]);return desc?y-x:x-y;});
rows.forEach(r=>tb.appendChild(r));}
"""
_STYLE = """body{font-family:sans-serif;margin:1em}table{border-collapse:collapse}td,th{border:1px solid #ccc;
padding:4px;text-align:center;font-size:12px}img{display:block;margin:auto}.bad{background:#fdd}
button{margin-right:.5em}figure{display:inline-block;margin:2px}figcaption{font-size:10px}"""


def write_gallery(path: Path, rows: list[GalleryRow], artifacts: list[str], title: str = "fmap QA gallery") -> Path:
    """Write the page atomically; rows start sorted by disagreement (most first)."""
    rows = sorted(rows, key=lambda r: (-r.disagreement, r.min_similarity, r.index))
    head = "".join(f"<th>{html.escape(a)}</th>" for a in artifacts)
    body = "\n".join(_row_html(r, artifacts) for r in rows)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{_STYLE}</style><script>{_SCRIPT}</script></head><body>
<h1>{html.escape(title)}</h1><p>{len(rows)} images, {len(artifacts)} artifacts. Sort:
<button onclick="sortBy('dis',true)">disagreement</button><button onclick="sortBy('sim',false)">lowest similarity</button>
<button onclick="sortBy('idx',false)">index</button></p>
<table><thead><tr><th>#</th><th>image</th><th>label</th>{head}<th>disagree</th><th>similarity</th></tr></thead>
<tbody>
{body}
</tbody></table></body></html>
"""
    return write_text(path, page)


def _row_html(r: GalleryRow, artifacts: list[str]) -> str:
    figs = "".join(f'<figure><img src="{uri}" alt="{html.escape(cap)}"><figcaption>{html.escape(cap)}</figcaption></figure>'
                   for cap, uri in r.thumbs)
    cells = []
    for a in artifacts:
        if a in r.preds:
            cls, conf = r.preds[a]
            cells.append(f"<td>{cls}<br>{conf:.2f}</td>")
        else:
            cells.append("<td>-</td>")
    sims = "<br>".join(f"{html.escape(a)}: {v:.2f}" for a, v in r.similarity.items()) or "-"
    label = "-" if r.label is None else str(r.label)
    cls = ' class="bad"' if r.disagreement else ""
    return (f'<tr{cls} data-dis="{r.disagreement}" data-sim="{r.min_similarity:.4f}" data-idx="{r.index}">'
            f"<td>{r.index}<br>{html.escape(r.name)}</td><td>{figs}</td><td>{label}</td>{''.join(cells)}"
            f"<td>{r.disagreement}</td><td>{sims}</td></tr>")
