"""Documentation stays true to the repository: no dangling references.

* every `docs/<file>` the code or the docs cite exists, and every `§N.N` cited with it is a
  heading of that file;
* nothing cites documents that are not in this repository (the design card, research notes);
* every relative Markdown link of README.md and docs/ points to an existing file (and, with
  `#anchor`, to an existing heading);
* README's DASH settings table is the one docs/config_table.py generates from vllm_dash.config.
"""
from __future__ import annotations

import importlib.util
import pathlib
import re
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
CITATION = re.compile(r"docs/([\w.-]+\.(?:md|py))(?:,?\s*§\s*(\d+(?:\.\d+)*))?")
FOREIGN = re.compile(r"DESIGN\.md|DESIGN §|research/|install\.md|vllm_api\.md")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _tracked_text_files() -> list[tuple[pathlib.Path, str]]:
    """(path, text) of the repository's text files (git-tracked, plus docs/), without the
    measurement records."""
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("not a git checkout")
    files = []
    for name in sorted(set(out.stdout.splitlines()) | set(_untracked_docs())):
        p = ROOT / name
        if name.startswith("benchmarks/results/") or not p.is_file():
            continue
        try:
            files.append((p, p.read_text()))
        except UnicodeDecodeError:
            continue
    return files


def _untracked_docs() -> list[str]:
    return [str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*") if p.is_file()]


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _headings(md: pathlib.Path) -> list[str]:
    return [line.lstrip("#").strip() for line in md.read_text().splitlines()
            if line.startswith("#")]


def test_cited_docs_and_sections_exist():
    missing = []
    for path, text in _tracked_text_files():
        for m in CITATION.finditer(text):
            doc = ROOT / "docs" / m.group(1)
            where = f"{path.relative_to(ROOT)}: {m.group(0)}"
            if not doc.is_file():
                missing.append(where + " (no such file)")
            elif m.group(2) and doc.suffix == ".md" and not any(
                    re.match(re.escape(m.group(2)) + r"[. ]", h) for h in _headings(doc)):
                missing.append(where + " (no such section)")
    assert not missing, "dangling documentation references:\n" + "\n".join(missing)


def test_no_references_to_documents_outside_the_repository():
    hits = [f"{path.relative_to(ROOT)}:{i + 1}: {line.strip()}"
            for path, text in _tracked_text_files() if path.name != "test_docs.py"
            for i, line in enumerate(text.splitlines()) if FOREIGN.search(line)]
    assert not hits, "citations of documents that are not in this repository:\n" + "\n".join(hits)


def test_markdown_links_resolve():
    bad = []
    for md in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in LINK.findall(md.read_text()):
            if re.match(r"[a-z]+:", target):             # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            dest = (md.parent / file_part).resolve() if file_part else md
            if not dest.exists():
                bad.append(f"{md.name}: {target} (no such file)")
            elif anchor and dest.suffix == ".md" and \
                    anchor not in {_anchor(h) for h in _headings(dest)}:
                bad.append(f"{md.name}: {target} (no such heading)")
    assert not bad, "broken links:\n" + "\n".join(bad)


def test_readme_config_table_is_generated():
    spec = importlib.util.spec_from_file_location("config_table", ROOT / "docs/config_table.py")
    config_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(config_table)
    readme = (ROOT / "README.md").read_text()
    assert config_table.readme_table(readme) == config_table.render(), \
        "README's DASH settings table is out of date: run `python docs/config_table.py --write`"
