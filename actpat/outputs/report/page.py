"""The report page: every registered section the artifacts support, in order, on one
self-contained HTML page (figures embedded, a strict Content-Security-Policy)."""

from __future__ import annotations

import datetime as _dt
from collections.abc import Iterable
from pathlib import Path

from ...errors import UserError
from .discover import find_artifacts
from .sections import REPORT_SECTIONS, Section, _esc


def build_sections(paths: Iterable[str | Path], gamma: float | None = None,
                   gamma_quantile: float | None = 0.1) -> tuple[list[Section], list[str]]:
    """Every section the artifacts under ``paths`` support, in the registry's order."""
    arts, notes = find_artifacts(paths, kinds=list(REPORT_SECTIONS))
    by = {k: [a for a in arts if a.kind == k] for k in {a.kind for a in arts} | set(REPORT_SECTIONS)}
    options = {"gamma": gamma, "gamma_quantile": None if gamma is not None else gamma_quantile}
    sections: list[Section] = []
    for kind, entry in REPORT_SECTIONS.items():
        try:
            sections += entry.render(by, sections, options)
        except (KeyError, TypeError, ValueError, IndexError) as e:  # an unexpected layout
            notes.append(f"{kind} results could not be drawn ({type(e).__name__}: {e}); "
                         f"files: {', '.join(str(a.path) for a in by[kind])}")
    return sections, notes


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;
max-width:1300px;color:#222;line-height:1.4;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em} h2{border-bottom:1px solid #ccc;padding-bottom:.2em;
margin-top:2em} h3{font-size:1em}
table{border-collapse:collapse;margin:.8em 0;font-size:.85em;display:block;overflow-x:auto;
max-width:100%}
th,td{border:1px solid #ddd;padding:.25em .5em;text-align:right}
th{background:#f3f3f3} td:first-child,th:first-child{text-align:left}
figure{margin:1em 0} img{max-width:100%;height:auto}
dl.settings{display:grid;grid-template-columns:max-content auto;gap:.15em 1em;font-size:.8em;
color:#444;background:#fafafa;padding:.6em;border:1px solid #eee}
dl.settings dt{font-weight:600} dl.settings dd{margin:0}
.note{color:#8a5a00;font-size:.9em} nav ul{columns:2} .sources{font-size:.75em;color:#777}
"""

# Records, after load, how many images failed to decode and how many loads the policy blocked.
CHECK_SCRIPT = """
var blocked=0;
document.addEventListener('securitypolicyviolation',function(){blocked++;
document.documentElement.setAttribute('data-blocked-loads',String(blocked));});
window.addEventListener('load',function(){var bad=0,imgs=document.images;
for(var i=0;i<imgs.length;i++){if(!imgs[i].complete||imgs[i].naturalWidth===0)bad++;}
var r=document.documentElement;r.setAttribute('data-images',String(imgs.length));
r.setAttribute('data-broken-images',String(bad));r.setAttribute('data-blocked-loads',String(blocked));
r.setAttribute('data-rendered','yes');});
"""

CSP = ("default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
       "script-src 'unsafe-inline'")


def render_html(sections: list[Section], notes: list[str], title: str = "actpat report") -> str:
    from ...version import __version__

    nav = "".join(f'<li><a href="#{s.id}">{_esc(s.title)}</a></li>' for s in sections)
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        f"<title>{_esc(title)}</title><style>{CSS}</style>",
        f"<script>{CHECK_SCRIPT}</script></head><body>",
        f"<h1>{_esc(title)}</h1>",
        f"<p>Activation patterns of parameters (Wang et al., AAAI 2025). Generated "
        f"{_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC by actpat {__version__}.</p>",
    ]
    if sections:
        parts.append(f"<nav><ul>{nav}</ul></nav>")
    else:
        parts.append('<p class="note">No results found in the given paths.</p>')
    for s in sections:
        src = ", ".join(_esc(x) for x in s.sources[:6]) + (" ..." if len(s.sources) > 6 else "")
        parts.append(f'<section id="{_esc(s.id)}"><h2>{_esc(s.title)}</h2>{s.body}'
                     f'<p class="sources">from: {src}</p></section>')
    if notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f'<li class="note">{_esc(n)}</li>'
                                                    for n in notes) + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(paths: Iterable[str | Path], out: str | Path, title: str = "actpat report",
                 gamma: float | None = None, gamma_quantile: float | None = 0.1) -> dict:
    """Write the page; return what it holds (section ids, notes, size)."""
    out = Path(out)
    if out.suffix.lower() not in (".html", ".htm"):
        raise UserError(f"--out {out} should end in .html")
    sections, notes = build_sections(list(paths), gamma, gamma_quantile)
    page = render_html(sections, notes, title)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    return {"out": str(out), "sections": [s.id for s in sections], "notes": notes,
            "bytes": len(page.encode("utf-8"))}
