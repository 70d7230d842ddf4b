"""Every handbook page carries the front matter the knowledge base indexes, and an ecosystem section.

The retriever prepends a page's `zh_title`, `zh_terms` and `terms` to each of its chunks
(`Chunk.search_text`), so they are what lets a question in Traditional Chinese find an
English page. A page without them, or with YAML that does not parse, is invisible to
those questions; the checks below catch that before an index is built.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

HANDBOOK = Path(__file__).resolve().parents[1] / "docs" / "handbook"
PAGES = sorted(p for p in HANDBOOK.glob("*.md") if p.name != "README.md")
FRONT_MATTER = re.compile(r"\A---\n(.*?)\n---\n", re.DOTALL)
CJK = re.compile(r"[\u3400-\u9fff]")
# Characters that exist only in Simplified Chinese (their Traditional forms differ): the
# titles and terms are Traditional, as the questions they must match are.
SIMPLIFIED_ONLY = set(
    "们这个为时间问题说应该头项预处机学权调参数张构键习计优层归编码断点损评测试检缓并运术开关与对发现长语"
    "词训练据记忆体络网图视频库务无从书读写认识决实验线类过还进样将么没动会经义细节转换链连误错顺质稳态标"
    "约简单压缩释译导级总报让输览丢载册极统适设备"
)
# Question words match every question that contains them, whatever it asks about (keyword
# search indexes Chinese characters and their bigrams), so titles and terms leave them out.
QUESTION_WORDS = ("什麼", "為什麼", "如何", "怎麼", "怎樣", "嗎", "呢")


def front_matter(page: Path) -> tuple[dict, str]:
    text = page.read_text(encoding="utf-8")
    match = FRONT_MATTER.match(text)
    assert match, f"{page.name}: must start with YAML front matter between two '---' lines"
    data = yaml.safe_load(match.group(1))
    assert isinstance(data, dict), f"{page.name}: front matter is not a mapping"
    return data, text[match.end():]


def test_handbook_pages_exist():
    assert len(PAGES) >= 30, PAGES


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_front_matter(page: Path):
    data, body = front_matter(page)
    assert set(data) >= {"zh_title", "zh_terms", "terms"}, f"{page.name}: keys {sorted(data)}"

    title = data["zh_title"]
    assert isinstance(title, str) and CJK.search(title), f"{page.name}: zh_title {title!r} has no Chinese"
    assert re.fullmatch(r"[^（）]+（[^（）]+）", title), (
        f"{page.name}: zh_title {title!r} must end with the English name in full-width parentheses"
    )

    zh_terms, terms = data["zh_terms"], data["terms"]
    assert isinstance(zh_terms, list) and 6 <= len(zh_terms) <= 15, f"{page.name}: {len(zh_terms)} zh_terms"
    assert all(isinstance(t, str) and t.strip() for t in zh_terms), f"{page.name}: zh_terms {zh_terms}"
    assert len(set(zh_terms)) == len(zh_terms), f"{page.name}: repeated zh_terms"
    assert sum(bool(CJK.search(t)) for t in zh_terms) >= len(zh_terms) // 2, f"{page.name}: zh_terms mostly not Chinese"
    assert isinstance(terms, list) and terms, f"{page.name}: no terms"
    assert all(isinstance(t, str) and t.strip() for t in terms), f"{page.name}: terms {terms}"

    simplified = sorted({c for s in [title, *zh_terms] for c in s if c in SIMPLIFIED_ONLY})
    assert not simplified, f"{page.name}: Simplified characters {simplified} in the Traditional Chinese title or terms"

    asking = sorted({w for s in [title, *zh_terms] for w in QUESTION_WORDS if w in s})
    assert not asking, f"{page.name}: question words {asking} in the title or terms"

    assert body.startswith("# "), f"{page.name}: the title line must follow the front matter"


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_ecosystem_section(page: Path):
    _, body = front_matter(page)
    section = re.search(r"^## In the wider ecosystem\n(.*?)(?=^## |\Z)", body, re.DOTALL | re.MULTILINE)
    assert section, f"{page.name}: no '## In the wider ecosystem' section"
    assert len(section.group(1).split()) >= 60, f"{page.name}: the ecosystem section is too short to say anything"
