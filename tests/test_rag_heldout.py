"""The held-out handbook questions: valid, balanced, disjoint from the main set, gold pages that exist.

The held-out set (lmforge/rag/data/handbook_questions_heldout.jsonl) was written from the
handbook pages alone, after the pages' front matter had been tuned on the main set, so
that retrieval figures on it are not flattered by that tuning. These tests keep it usable
for that purpose: a held-out question that also appears in the main set, or a gold page
that no longer exists, would quietly spoil the measurement.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from importlib import resources
from pathlib import Path

import pytest
import yaml

from lmforge.errors import LmforgeError
from lmforge.rag.metrics import KINDS, check_gold_pages, load_questions

REPO = Path(__file__).resolve().parents[1]
HANDBOOK = REPO / "docs" / "handbook"
HELDOUT = REPO / "lmforge" / "rag" / "data" / "handbook_questions_heldout.jsonl"

# Characters that exist only in Simplified Chinese, and mainland terms a Taiwanese user would not write.
SIMPLIFIED_ONLY = set("们这为资训练数据记忆与个说时么对会优阶层输问题词语级长开关发动应该术网页经过请让还边运进选单带实现")
MAINLAND_TERMS = ("內存", "數據", "信息", "默認", "軟件", "視頻", "網絡", "服務器", "硬件", "緩存", "質量", "運行")
OUT_OF_SCOPE_KINDS = ("everyday", "profession", "ml near-miss")


@pytest.fixture(scope="module")
def heldout():
    return load_questions(HELDOUT)


def normalized(text: str) -> str:
    """A question reduced to its letters and digits, so that punctuation or case cannot hide a copy."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return "".join(ch for ch in text if ch.isalnum())


def test_the_heldout_file_loads_by_path_and_ships_in_the_package(heldout):
    # 160 questions written with the set, then 40 more out-of-scope ones (ho-oos-*) for the refusal figures.
    assert len(heldout) == len(HELDOUT.read_text(encoding="utf-8").splitlines()) == 200
    first = heldout[0]
    assert (first.id, first.lang, first.kind) == ("ho-en-001", "en", "concept")
    assert first.gold == ("api-vs-self-hosting.md", "cost-estimation.md")
    packaged = resources.files("lmforge.rag") / "data" / HELDOUT.name
    assert load_questions(str(packaged)) == heldout


def test_a_corrupted_copy_is_refused_with_its_file_and_line(tmp_path, heldout):
    lines = HELDOUT.read_text(encoding="utf-8").splitlines()
    record = json.loads(lines[4])
    assert record["gold"], "line 5 should be an in-scope question"
    lines[4] = json.dumps({**record, "kind": "out_of_scope"}, ensure_ascii=False)
    broken = tmp_path / "heldout.jsonl"
    broken.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(LmforgeError, match=r"heldout\.jsonl:5: an out_of_scope question must have an empty gold"):
        load_questions(broken)
    lines[4] = json.dumps({**record, "id": heldout[0].id}, ensure_ascii=False)
    broken.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(LmforgeError, match=r"heldout\.jsonl:5: duplicate id 'ho-en-001' \(first on line 1\)"):
        load_questions(broken)


def test_the_heldout_set_is_balanced_across_languages_kinds_and_pages(heldout):
    pages = {p.name for p in HANDBOOK.glob("*.md")} - {"README.md"}
    for lang, prefix in (("en", "ho-en-"), ("zh-Hant", "ho-zh-")):
        questions = [q for q in heldout if q.lang == lang]
        oos_prefix = prefix.replace("ho-", "ho-oos-")
        assert all(q.id.startswith(prefix) or (q.id.startswith(oos_prefix) and not q.in_scope)
                   for q in questions), lang
        in_scope = [q for q in questions if q.in_scope]
        out_of_scope = [q for q in questions if not q.in_scope]
        assert 55 <= len(in_scope) <= 75 and len(out_of_scope) >= 15, (lang, len(in_scope), len(out_of_scope))
        kinds = Counter(q.kind for q in in_scope)
        assert set(kinds) == set(KINDS) - {"out_of_scope"} and min(kinds.values()) >= 10, (lang, kinds)
        covered = {page for q in in_scope for page in q.gold}
        firsts = {q.gold[0] for q in in_scope}
        assert len(covered) >= 45 and len(firsts) >= 40, (lang, sorted(pages - covered))
        assert sum(len(q.gold) > 1 for q in in_scope) >= 15, lang
        # Out-of-scope questions come from everyday life, other professions, and ML topics no page covers.
        assert {note for q in out_of_scope for note in OUT_OF_SCOPE_KINDS if q.notes.startswith(note)} \
            == set(OUT_OF_SCOPE_KINDS), lang
    texts = [normalized(q.question) for q in heldout]
    assert len(set(texts)) == len(texts), "a question appears twice"


def test_every_gold_page_exists_in_the_handbook(heldout):
    check_gold_pages(heldout, HANDBOOK)
    assert not any(page == "README.md" for q in heldout for page in q.gold), "the index page is never an answer"


def test_the_heldout_set_shares_no_id_and_no_question_with_the_main_set(heldout):
    main = load_questions()
    assert not {q.id for q in main} & {q.id for q in heldout}
    shared = {normalized(q.question) for q in main} & {normalized(q.question) for q in heldout}
    assert not shared, f"{len(shared)} held-out question(s) also in the main set"


def test_chinese_questions_are_traditional_and_taiwanese(heldout):
    chinese = [q for q in heldout if q.lang == "zh-Hant"]
    for q in chinese:
        assert re.search(r"[\u4e00-\u9fff]", q.question), q.id
        assert not SIMPLIFIED_ONLY & set(q.question), (q.id, sorted(SIMPLIFIED_ONLY & set(q.question)))
        assert not [term for term in MAINLAND_TERMS if term in q.question], (q.id, q.question)
    # Engineers in Taiwan mix English terms into Chinese questions; the set should too.
    assert sum(bool(re.search(r"[A-Za-z]{2,}", q.question)) for q in chinese) >= len(chinese) // 2


def test_questions_are_not_copied_from_their_pages_headings_or_term_lists(heldout):
    copied_headings, with_terms = [], []
    for q in [q for q in heldout if q.in_scope]:
        page = (HANDBOOK / q.gold[0]).read_text(encoding="utf-8")
        headings = [h.strip().lower() for h in re.findall(r"^#{1,3} (.+)$", page, flags=re.M)]
        if any(len(h.split()) >= 2 and h in q.question.lower() for h in headings):
            copied_headings.append(q.id)
        front = yaml.safe_load(page.split("---")[1])
        terms = {str(term).lower() for term in front.get("terms", []) + front.get("zh_terms", [])}
        found = {term for term in terms if term in q.question.lower()}
        found = {term for term in found if not any(term != other and term in other for other in found)}
        if len(found) >= 2:
            with_terms.append(q.id)
    assert not copied_headings, copied_headings
    # A user names a concept now and then (BLEU or chrF?); a question stacked with a page's key terms is a copy.
    assert len(with_terms) <= 3, with_terms
