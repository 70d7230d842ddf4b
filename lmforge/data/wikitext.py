"""MediaWiki markup -> plain text.

A Wikipedia dump stores articles as wikitext: ``'''bold'''``, ``[[target|label]]`` links,
``{{templates}}`` (infoboxes, citations), ``{| tables |}``, ``<ref>`` footnotes and
``[[File:...]]`` images. For language-model text we keep the prose a reader sees and drop
the rest. Templates and tables nest, so they are removed from the innermost outwards
until none is left; links keep their visible label. Sections that are lists of sources
rather than prose (References, External links, ...) are dropped whole.

This is a pragmatic stripper, not a MediaWiki parser: template output (e.g. a
``{{convert|5|km}}`` that would render "5 km") is lost, which costs a few words per
article and never adds markup.
"""

from __future__ import annotations

import html
import re

# Sections that hold references, link lists and navigation rather than prose.
BOILERPLATE_SECTIONS = frozenset({
    "references", "external links", "see also", "further reading", "notes", "bibliography",
    "sources", "footnotes", "citations", "notes and references", "references and notes",
    "works cited", "other websites", "gallery",
})
# Link namespaces whose targets are not running text.
_DROPPED_LINK_PREFIXES = ("file:", "image:", "category:", "media:", "wikipedia:", "wp:", "help:",
                          "template:", "portal:", "special:", "user:", "talk:", "draft:", "module:")

_COMMENT = re.compile(r"<!--.*?-->", re.DOTALL)
_REF_PAIRED = re.compile(r"<ref\b[^>/]*(?:/(?!>)[^>/]*)*>.*?</ref\s*>", re.DOTALL | re.IGNORECASE)
_REF_SINGLE = re.compile(r"<ref\b[^>]*/>", re.IGNORECASE)
# Tags whose content is not prose (formulas, code listings, image galleries...).
_DROPPED_BLOCKS = re.compile(
    r"<(math|gallery|timeline|syntaxhighlight|source|score|graph|mapframe|imagemap|chem|ce|hiero)\b"
    r"[^>]*>.*?</\1\s*>", re.DOTALL | re.IGNORECASE)
_TAG = re.compile(r"</?[a-zA-Z][a-zA-Z0-9]*\b[^>]*?/?>")
_TEMPLATE = re.compile(r"\{\{(?:[^{}]|\{(?!\{)|\}(?!\}))*\}\}")
_TABLE = re.compile(r"\{\|(?:[^{|]|\{(?!\|)|\|(?!\}))*?\|\}", re.DOTALL)
_PARSER_BRACES = re.compile(r"\{\{\{[^{}]*\}\}\}")
_INTERNAL_LINK = re.compile(r"\[\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\]")
_EXTERNAL_LINK = re.compile(r"\[(?:https?:|ftp:|//)[^\s\]]*(?:\s+([^\]]*))?\]")
_BARE_URL = re.compile(r"(?<![\w/])https?://\S+")
_EMPHASIS = re.compile(r"'{2,5}")
_HEADING = re.compile(r"^(={1,6})\s*(.*?)\s*\1\s*$", re.MULTILINE)
_MAGIC_WORD = re.compile(r"__[A-Z]+__")
_LIST_PREFIX = re.compile(r"^[*#:;]+\s*", re.MULTILINE)
_HORIZONTAL_RULE = re.compile(r"^-{4,}\s*$", re.MULTILINE)
_SPACES = re.compile(r"[ \t\u00a0]+")
_BLANK_LINES = re.compile(r"\n{3,}")
_EMPTY_PARENS = re.compile(r"\(\s*[,;]?\s*\)")
_SPACE_BEFORE_PUNCT = re.compile(r" +([,.;:!?])")


def _remove_nested(pattern: re.Pattern[str], text: str, max_rounds: int = 50) -> str:
    """Remove innermost matches until none is left (templates and tables nest)."""
    for _ in range(max_rounds):
        text, n = pattern.subn("", text)
        if not n:
            break
    return text


def _link_label(match: re.Match[str]) -> str:
    inner = match.group(1)
    target, _, label = inner.partition("|")
    lowered = target.strip().lower()
    if lowered.startswith(_DROPPED_LINK_PREFIXES):
        return ""
    # Interlanguage links ("de:Artikel") have a short lowercase prefix before the colon.
    if re.match(r"^:?[a-z]{2,3}(?:-[a-z]+)?:", lowered) and not label:
        return ""
    if label:
        # [[a|b|c]]: only File links have more than one pipe; the label is the last part.
        return label.rsplit("|", 1)[-1]
    return target.lstrip(":").split("#")[0] or target


def _drop_boilerplate_sections(text: str) -> str:
    out: list[str] = []
    skipping_level = 0
    for line in text.split("\n"):
        m = _HEADING.match(line)
        if m:
            level, title = len(m.group(1)), m.group(2).strip().lower()
            if skipping_level and level > skipping_level:
                continue  # a subsection of a dropped section
            skipping_level = level if title in BOILERPLATE_SECTIONS else 0
            if not skipping_level:
                out.append("")
                out.append(m.group(2).strip())  # keep the heading as its own paragraph
                out.append("")
            continue
        if not skipping_level:
            out.append(line)
    return "\n".join(out)


def strip_wiki_markup(wikitext: str) -> str:
    """Plain prose from one article's wikitext (paragraphs separated by blank lines)."""
    text = _COMMENT.sub("", wikitext)
    text = _REF_PAIRED.sub("", text)
    text = _REF_SINGLE.sub("", text)
    text = _DROPPED_BLOCKS.sub("", text)
    text = _PARSER_BRACES.sub("", text)
    text = _remove_nested(_TEMPLATE, text)
    text = _remove_nested(_TABLE, text)
    for _ in range(10):  # innermost links first, so captions of File links lose their inner links
        text, n = _INTERNAL_LINK.subn(_link_label, text)
        if not n:
            break
    text = _EXTERNAL_LINK.sub(lambda m: m.group(1) or "", text)
    text = _BARE_URL.sub("", text)
    text = _drop_boilerplate_sections(text)
    text = _TAG.sub("", text)
    text = html.unescape(text)  # &nbsp; &ndash; ... written as entities inside the wikitext
    text = _EMPHASIS.sub("", text)
    text = _MAGIC_WORD.sub("", text)
    text = _HORIZONTAL_RULE.sub("", text)
    text = _LIST_PREFIX.sub("", text)
    lines = []
    for line in text.split("\n"):
        line = _SPACES.sub(" ", line).strip()
        # Leftovers of tables or templates that were cut mid-way (unbalanced markup).
        if line.startswith(("{|", "|}", "|-", "!", "|")) or line in ("}}", "{{"):
            continue
        line = _EMPTY_PARENS.sub("", line)
        line = _SPACE_BEFORE_PUNCT.sub(r"\1", line)
        lines.append(line)
    text = "\n".join(lines)
    return _BLANK_LINES.sub("\n\n", text).strip()
