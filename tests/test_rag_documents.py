"""Document loaders: Markdown with front matter, text, HTML, PDF, and the directory walk."""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path

import pytest

from lmforge.errors import LmforgeError
from lmforge.rag.documents import DocumentSkipped, iter_documents, load_document, split_front_matter

ROOT = Path(__file__).resolve().parents[1]


def make_pdf(pages: list[list[str]], title: str | None = None) -> bytes:
    """A minimal PDF whose pages hold the given lines in Helvetica (a real text layer)."""
    objects: list[bytes] = []

    def add(body: bytes) -> int:
        objects.append(body)
        return len(objects)

    font = add(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    contents = []
    for lines in pages:
        ops = ["BT", "/F1 12 Tf", "14 TL", "72 720 Td"]
        for line in lines:
            ops.append("(" + line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)") + ") Tj T*")
        ops.append("ET")
        stream = "\n".join(ops).encode("latin-1")
        contents.append(add(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream"))
    pages_id = len(objects) + len(pages) + 1
    kids = [add(b"<< /Type /Page /Parent %d 0 R /MediaBox [0 0 612 792] /Contents %d 0 R "
                b"/Resources << /Font << /F1 %d 0 R >> >> >>" % (pages_id, c, font)) for c in contents]
    assert add(b"<< /Type /Pages /Kids [%s] /Count %d >>"
               % (b" ".join(b"%d 0 R" % k for k in kids), len(kids))) == pages_id
    catalog = add(b"<< /Type /Catalog /Pages %d 0 R >>" % pages_id)
    info = add(b"<< /Title (%s) >>" % title.encode("latin-1")) if title else None
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    for offset in offsets:
        out += b"%010d 00000 n \n" % offset
    trailer = b"<< /Size %d /Root %d 0 R" % (len(objects) + 1, catalog)
    if info:
        trailer += b" /Info %d 0 R" % info
    out += b"trailer\n" + trailer + b" >>\nstartxref\n%d\n%%%%EOF\n" % xref
    return bytes(out)


MARKDOWN = """---
zh_title: 退款政策（Refunds）
zh_terms: [退款, 退貨]
terms: [refund, return]
updated: 2024-05-01
---
# Refund policy

Items can be returned within 30 days.

## How to ask

Write to us.
"""


def test_markdown_front_matter_title_and_lines(tmp_path):
    path = tmp_path / "refunds.md"
    path.write_text(MARKDOWN, encoding="utf-8")
    doc = load_document(path)
    assert doc.kind == "markdown" and doc.source == "refunds.md"
    assert doc.title == "Refund policy"
    assert doc.metadata == {"zh_title": "退款政策（Refunds）", "zh_terms": ["退款", "退貨"],
                            "terms": ["refund", "return"], "updated": "2024-05-01"}
    assert doc.digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert "zh_title" not in doc.text and doc.text.startswith("# Refund policy")
    # The text's lines keep the file's numbers: the heading is on line 7 of the file.
    file_lines = path.read_text(encoding="utf-8").split("\n")
    assert doc.first_line == 7
    for index, line in enumerate(doc.text.split("\n")):
        first, last = doc.file_lines(index)
        assert first == last and file_lines[first - 1] == line


def test_markdown_title_fallbacks_and_crlf(tmp_path):
    (tmp_path / "a.md").write_bytes(b"\xef\xbb\xbf```\n# not a title\n```\n\nSome text.\r\n## Sub\r\n")
    doc = load_document(tmp_path / "a.md")
    assert doc.title == "a" and "\r" not in doc.text and not doc.text.startswith("\ufeff")
    (tmp_path / "b.md").write_text("---\ntitle: Given title\n---\n# Heading\n", encoding="utf-8")
    assert load_document(tmp_path / "b.md").title == "Given title"


@pytest.mark.parametrize("text, message", [
    ("---\nzh_title: [unclosed\n---\n# T\n", "front matter is not valid YAML"),
    ("---\n- a\n- b\n---\n# T\n", "front matter must be a mapping"),
    ("---\nzh_title: x\n# T\n", "never closed"),
])
def test_bad_front_matter_is_one_clear_error(tmp_path, text, message):
    path = tmp_path / "bad.md"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(LmforgeError, match=message) as info:
        load_document(path)
    assert str(path) in str(info.value)


def test_front_matter_error_names_the_file_line():
    with pytest.raises(LmforgeError, match=r"page.md:3: front matter is not valid YAML \(mapping values"):
        split_front_matter("---\na: 1\nb: x: y\nc: 2\n---\n", "page.md")


def test_plain_text_and_non_utf8(tmp_path):
    (tmp_path / "notes.txt").write_text("First line.\n\nSecond paragraph.\n", encoding="utf-8")
    doc = load_document(tmp_path / "notes.txt")
    assert (doc.kind, doc.title, doc.text) == ("text", "notes", "First line.\n\nSecond paragraph.\n")
    (tmp_path / "latin.txt").write_bytes("ok\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(LmforgeError, match=r"latin.txt:2: not UTF-8"):
        load_document(tmp_path / "latin.txt")


HTML = """<!DOCTYPE html>
<html><head><title>Refunds &amp; returns</title>
<style>body { color: red }</style>
<script>var x = "<p>not text</p>";</script>
</head>
<body>
<nav><a href="/">Home</a> | <a href="/faq">FAQ</a></nav>
<h1>Refund policy</h1>
<p>You can return an item within
   30 days &mdash; no questions asked.</p>
<h2>How to ask</h2>
<ul><li>Write to us</li><li>Wait for the label &lt;free&gt;</li></ul>
<pre><code>lmforge rag index docs/
  --store x
</code></pre>
<table><tr><th>Plan</th><th>Days</th></tr>
<tr><td>Basic</td><td>30</td></tr></table>
<div hidden>secret</div>
<p>&#x4F60;好，退款政策。</p>
</body></html>
"""


def test_html_visible_text_as_markdown_with_file_lines(tmp_path):
    path = tmp_path / "page.html"
    path.write_text(HTML, encoding="utf-8")
    doc = load_document(path)
    assert doc.kind == "html" and doc.title == "Refund policy"
    assert doc.text.split("\n") == [
        "# Refund policy", "",
        "You can return an item within 30 days \u2014 no questions asked.", "",
        "## How to ask", "",
        "- Write to us", "- Wait for the label <free>", "",
        "```", "lmforge rag index docs/", "  --store x", "```", "",
        "| Plan | Days |", "| Basic | 30 |", "",
        "你好，退款政策。",
    ]
    for dropped in ("color", "not text", "Home", "FAQ", "secret", "Refunds &"):
        assert dropped not in doc.text
    spans = {line: doc.file_lines(i) for i, line in enumerate(doc.text.split("\n")) if line}
    assert spans["# Refund policy"] == (8, 8)
    assert spans["You can return an item within 30 days \u2014 no questions asked."] == (9, 10)
    assert spans["  --store x"] == (14, 14)
    assert spans["| Basic | 30 |"] == (17, 17)
    assert spans["你好，退款政策。"] == (19, 19)


def test_html_title_from_title_element_and_declared_charset(tmp_path):
    path = tmp_path / "old.htm"
    path.write_bytes('<html><head><meta charset="iso-8859-1"><title>Caf\xe9</title></head>'
                     '<body><p>cr\xe8me</p></body></html>'.encode("latin-1"))
    doc = load_document(path)
    assert (doc.title, doc.text) == ("Café", "crème")


def test_pdf_text_pages_and_title(tmp_path):
    path = tmp_path / "policy.pdf"
    path.write_bytes(make_pdf([["Refund policy", "Items can be returned (within 30 days)."],
                               ["Second page text."]], title="Policy"))
    doc = load_document(path)
    assert doc.kind == "pdf" and doc.title == "Policy" and doc.metadata == {"page_count": 2}
    lines = doc.text.split("\n")
    assert lines == ["Refund policy", "Items can be returned (within 30 days).", "", "Second page text."]
    assert [doc.page_of(i) for i in range(len(lines))] == [1, 1, 1, 2]  # the break belongs to page 1


def test_pdf_without_text_or_with_password_is_refused(tmp_path):
    pypdf = pytest.importorskip("pypdf")
    writer = pypdf.PdfWriter()
    writer.add_blank_page(200, 200)
    writer.write(tmp_path / "scan.pdf")
    with pytest.raises(LmforgeError, match="no page of the PDF has a text layer"):
        load_document(tmp_path / "scan.pdf")

    (tmp_path / "plain.pdf").write_bytes(make_pdf([["Secret plans."]]))
    for name, user_password in (("locked.pdf", "pw"), ("owner-only.pdf", "")):
        writer = pypdf.PdfWriter()
        writer.append(tmp_path / "plain.pdf")
        writer.encrypt(user_password=user_password, owner_password="owner", algorithm="RC4-128")
        writer.write(tmp_path / name)
    with pytest.raises(LmforgeError, match="encrypted with a password"):
        load_document(tmp_path / "locked.pdf")
    # Encrypted with an empty user password (only editing restricted): readable as is.
    assert load_document(tmp_path / "owner-only.pdf").text == "Secret plans."

    (tmp_path / "broken.pdf").write_bytes(b"%PDF-1.4\nnot really\n")
    with pytest.raises(LmforgeError, match="broken.pdf"):
        load_document(tmp_path / "broken.pdf")


def build_tree(root: Path) -> None:
    (root / "guide").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / ".git" / "notes.md").write_text("# hidden dir\n", encoding="utf-8")
    (root / ".draft.md").write_text("# hidden file\n", encoding="utf-8")
    (root / "b.md").write_text("# B\n\nbody\n", encoding="utf-8")
    (root / "a.txt").write_text("alpha\n", encoding="utf-8")
    (root / "guide" / "setup.html").write_text("<h1>Setup</h1><p>Run it.</p>", encoding="utf-8")
    (root / "image.png").write_bytes(b"\x89PNG")


def test_walk_is_sorted_relative_and_skips_hidden(tmp_path):
    build_tree(tmp_path)
    docs = list(iter_documents(tmp_path))
    assert [d.source for d in docs] == ["a.txt", "b.md", "guide/setup.html"]
    assert [d.source for d in iter_documents(tmp_path, suffixes=["md"])] == ["b.md"]
    # A file given directly keeps its own name, whatever directory it is in.
    assert [d.source for d in iter_documents([tmp_path / "guide" / "setup.html", tmp_path / "b.md"])] \
        == ["setup.html", "b.md"]


def test_walk_skips_bad_files_with_a_warning_unless_strict(tmp_path):
    build_tree(tmp_path)
    (tmp_path / "latin.txt").write_bytes(b"caf\xe9\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sources = [d.source for d in iter_documents(tmp_path)]
    assert sources == ["a.txt", "b.md", "guide/setup.html"]
    assert [w.category for w in caught] == [DocumentSkipped] and "latin.txt:1: not UTF-8" in str(caught[0].message)
    skipped = []
    list(iter_documents(tmp_path, on_skip=lambda path, reason: skipped.append(path.name)))
    assert skipped == ["latin.txt"]
    with pytest.raises(LmforgeError, match="not UTF-8"):
        list(iter_documents(tmp_path, strict=True))


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="permissions do not bind root")
def test_unreadable_file(tmp_path):
    path = tmp_path / "secret.md"
    path.write_text("# S\n", encoding="utf-8")
    path.chmod(0)
    try:
        with pytest.raises(LmforgeError, match="cannot read .*secret.md"):
            load_document(path)
        with pytest.warns(DocumentSkipped, match="secret.md"), pytest.raises(LmforgeError, match="1 could not"):
            list(iter_documents(tmp_path))
    finally:
        path.chmod(0o644)


def test_walk_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "photo.jpg").write_bytes(b"")
    with pytest.raises(LmforgeError, match="no documents found in .*empty"):
        list(iter_documents(tmp_path / "empty"))
    with pytest.raises(LmforgeError, match="does not exist"):
        list(iter_documents(tmp_path / "missing"))
    with pytest.raises(LmforgeError, match="unsupported document type '.jpg'"):
        list(iter_documents(tmp_path / "empty" / "photo.jpg"))
    with pytest.raises(LmforgeError, match="unsupported document type '.docx'"):
        list(iter_documents(tmp_path, suffixes=[".docx"]))
    for folder in ("x", "y"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "README.md").write_text("# R\n", encoding="utf-8")
    with pytest.raises(LmforgeError, match="same source 'README.md'"):
        list(iter_documents([tmp_path / "x", tmp_path / "y"]))


def test_the_handbook_loads():
    docs = list(iter_documents(ROOT / "docs" / "handbook", suffixes=[".md"]))
    assert len(docs) >= 30 and all(d.title and d.kind == "markdown" for d in docs)
    for doc in docs:
        assert not doc.text.startswith("---")
        if doc.metadata:  # front matter: cut from the text, line numbers kept
            assert doc.first_line > 1 and doc.metadata.get("zh_title")
            file_lines = (ROOT / "docs" / "handbook" / doc.source).read_text(encoding="utf-8").split("\n")
            assert file_lines[doc.first_line - 1:] == doc.text.split("\n")
