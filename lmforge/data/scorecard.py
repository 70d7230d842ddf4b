"""The dataset scorecard: what each stage did to the corpus, as JSON and markdown (D6).

A data pipeline silently shapes the model: a filter that is too strict can remove a
whole dialect, a dedup bug can leave a page a thousand times. The scorecard makes each
stage's effect visible: documents and bytes entering and leaving it, why documents were
dropped, the duplication rate, the language mix, PII hits, decontamination, the
per-split token counts and a diversity figure (distinct words / words). It is written
next to the shards so that every packed dataset carries its own description.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

_WORD = re.compile(r"\w+")


@dataclass
class StageStats:
    docs_in: int = 0
    bytes_in: int = 0
    docs_out: int = 0
    bytes_out: int = 0
    dropped: Counter[str] = field(default_factory=Counter)

    def to_dict(self) -> dict[str, Any]:
        return {"docs_in": self.docs_in, "bytes_in": self.bytes_in, "docs_out": self.docs_out,
                "bytes_out": self.bytes_out, "docs_dropped": self.docs_in - self.docs_out,
                "dropped_by_reason": dict(self.dropped.most_common())}


class Scorecard:
    """Collects counts while the pipeline runs; ``to_dict`` / ``to_markdown`` report them."""

    def __init__(self, diversity_word_budget: int = 500_000) -> None:
        self.stages: dict[str, StageStats] = {}
        self.sources: dict[str, dict[str, int]] = {}
        self.languages: Counter[str] = Counter()
        self.language_bytes: Counter[str] = Counter()
        self.scripts: Counter[str] = Counter()
        self.quality_reasons: Counter[str] = Counter()
        self.pii: Counter[str] = Counter()
        self.pii_docs = 0
        self.splits: dict[str, dict[str, int]] = {}
        self.info: dict[str, Any] = {}
        self._word_budget = diversity_word_budget
        self._words_seen = 0
        self._distinct: set[str] = set()

    def stage(self, name: str) -> StageStats:
        return self.stages.setdefault(name, StageStats())

    def passed(self, name: str, bytes_in: int, bytes_out: int) -> None:
        s = self.stage(name)
        s.docs_in += 1
        s.bytes_in += bytes_in
        s.docs_out += 1
        s.bytes_out += bytes_out

    def dropped(self, name: str, bytes_in: int, reason: str) -> None:
        s = self.stage(name)
        s.docs_in += 1
        s.bytes_in += bytes_in
        s.dropped[reason] += 1

    def observe_kept_text(self, text: str) -> None:
        if self._words_seen < self._word_budget:
            words = _WORD.findall(text.lower())[: self._word_budget - self._words_seen]
            self._words_seen += len(words)
            self._distinct.update(words)

    def source(self, name: str, docs: int = 0, nbytes: int = 0) -> None:
        entry = self.sources.setdefault(name, {"docs": 0, "bytes": 0})
        entry["docs"] += docs
        entry["bytes"] += nbytes

    # ------------------------------------------------------------------ reports
    def to_dict(self) -> dict[str, Any]:
        stages = {name: s.to_dict() for name, s in self.stages.items()}
        first = next(iter(self.stages.values()), StageStats())
        last = list(self.stages.values())[-1] if self.stages else StageStats()
        dedup_in = sum(self.stages[n].docs_in for n in ("exact_dedup",) if n in self.stages)
        dup_docs = sum(self.stages[n].docs_in - self.stages[n].docs_out
                       for n in ("exact_dedup", "near_dedup") if n in self.stages)
        total_lang = sum(self.languages.values()) or 1
        kept_bytes = last.bytes_out or 1
        return {
            "summary": {
                "docs_in": first.docs_in, "bytes_in": first.bytes_in,
                "docs_out": last.docs_out, "bytes_out": last.bytes_out,
                "docs_kept_fraction": round(last.docs_out / first.docs_in, 4) if first.docs_in else 0.0,
                "bytes_kept_fraction": round(last.bytes_out / first.bytes_in, 4) if first.bytes_in else 0.0,
            },
            "sources": self.sources,
            "stages": stages,
            "duplication": {
                "document_duplicate_rate": round(dup_docs / dedup_in, 4) if dedup_in else 0.0,
                "exact_duplicates": stages.get("exact_dedup", {}).get("docs_dropped", 0),
                "near_duplicates": stages.get("near_dedup", {}).get("docs_dropped", 0),
                **self.info.get("paragraph_dedup", {}),
            },
            "quality_filter_reasons": dict(self.quality_reasons.most_common()),
            "languages": {lang: {"docs": n, "share": round(n / total_lang, 4), "bytes": self.language_bytes[lang]}
                          for lang, n in self.languages.most_common()},
            "scripts": dict(self.scripts.most_common()),
            "pii": {"matches": dict(self.pii.most_common()), "documents_with_pii": self.pii_docs,
                    "matches_per_mb": round(sum(self.pii.values()) / (kept_bytes / 1e6), 3)},
            "diversity": {"words_sampled": self._words_seen, "distinct_words": len(self._distinct),
                          "distinct_word_ratio": round(len(self._distinct) / self._words_seen, 4)
                          if self._words_seen else 0.0},
            "splits": self.splits,
            **{k: v for k, v in self.info.items() if k != "paragraph_dedup"},
        }

    def to_markdown(self, title: str = "Dataset scorecard") -> str:
        d = self.to_dict()
        s = d["summary"]
        lines = [f"# {title}", ""]
        lines.append(f"Kept {s['docs_out']:,} of {s['docs_in']:,} documents "
                     f"({100 * s['docs_kept_fraction']:.1f}%) and {s['bytes_out'] / 1e6:.2f} of "
                     f"{s['bytes_in'] / 1e6:.2f} MB ({100 * s['bytes_kept_fraction']:.1f}%).")
        lines += ["", "## Sources", "", "| source | docs | MB |", "|---|---:|---:|"]
        for name, v in d["sources"].items():
            lines.append(f"| {name} | {v['docs']:,} | {v['bytes'] / 1e6:.2f} |")
        lines += ["", "## Stages", "", "| stage | docs in | docs out | MB in | MB out | dropped because |",
                  "|---|---:|---:|---:|---:|---|"]
        for name, v in d["stages"].items():
            why = ", ".join(f"{r} {n}" for r, n in v["dropped_by_reason"].items()) or ""
            lines.append(f"| {name} | {v['docs_in']:,} | {v['docs_out']:,} | {v['bytes_in'] / 1e6:.2f} | "
                         f"{v['bytes_out'] / 1e6:.2f} | {why} |")
        dup = d["duplication"]
        lines += ["", "## Duplication", "",
                  f"- document duplicate rate: {100 * dup['document_duplicate_rate']:.2f}% "
                  f"({dup['exact_duplicates']} exact, {dup['near_duplicates']} near)"]
        if "paragraphs_removed" in dup:
            lines.append(f"- paragraphs removed as repeats: {dup['paragraphs_removed']:,} "
                         f"({dup.get('paragraph_bytes_removed', 0) / 1e3:.1f} KB)")
        if d["quality_filter_reasons"]:
            lines += ["", "## Quality filter (every rule a dropped document broke)", "", "| rule | docs |", "|---|---:|"]
            lines += [f"| {r} | {n:,} |" for r, n in d["quality_filter_reasons"].items()]
        lines += ["", "## Languages (after cleaning)", "", "| language | docs | share | MB |", "|---|---:|---:|---:|"]
        lines += [f"| {lang} | {v['docs']:,} | {100 * v['share']:.1f}% | {v['bytes'] / 1e6:.2f} |"
                  for lang, v in d["languages"].items()]
        pii = d["pii"]
        lines += ["", "## PII", "", f"- documents with PII: {pii['documents_with_pii']:,}; "
                  f"matches per MB kept: {pii['matches_per_mb']}"]
        lines += [f"- {kind}: {n:,}" for kind, n in pii["matches"].items()]
        if "decontamination" in d:
            c = d["decontamination"]
            lines += ["", "## Decontamination", "",
                      f"- {c['eval_items']:,} evaluation items, {c['eval_ngrams']:,} distinct {c['n']}-grams "
                      f"from {len(c['files'])} file(s); {c['docs_removed']:,} documents removed"]
        div = d["diversity"]
        lines += ["", "## Diversity", "", f"- {div['distinct_words']:,} distinct words in the first "
                  f"{div['words_sampled']:,} words kept (ratio {div['distinct_word_ratio']})"]
        if d["splits"]:
            lines += ["", "## Splits", "", "| split | docs | tokens | rows |", "|---|---:|---:|---:|"]
            lines += [f"| {name} | {v.get('documents', 0):,} | {v.get('tokens', 0):,} | {v.get('rows', 0):,} |"
                      for name, v in d["splits"].items()]
        return "\n".join(lines) + "\n"
