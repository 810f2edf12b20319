"""Every relative link in the README and the docs points at a file that exists."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _relative_links(md: Path):
    for target in LINK.findall(md.read_text()):
        if "://" in target or target.startswith(("#", "mailto:")):
            continue
        yield target.split("#")[0]


def test_relative_links_resolve():
    docs = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").rglob("*.md"))]
    broken = [f"{md.relative_to(ROOT)} -> {t}" for md in docs for t in _relative_links(md)
              if t and not (md.parent / t).exists()]
    assert not broken, broken


def test_summary_links_every_results_model():
    summary = (ROOT / "docs" / "results" / "summary.md").read_text()
    linked = {t for t in _relative_links(ROOT / "docs" / "results" / "summary.md")}
    for model in ("smollm2", "qwen2.5-coder-0.5b"):
        assert any(model in t for t in linked), model
    assert "summary.md" in (ROOT / "README.md").read_text()
    assert summary.count("| **") >= 8  # one row per claim
