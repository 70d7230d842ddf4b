"""Prompt versions, sticky weighted A/B assignment, per-variant results and the response cache."""

from __future__ import annotations

import math

import pytest

from lmforge.assistant.conversations import ConversationStore
from lmforge.assistant.db import open_database
from lmforge.assistant.prompts import PromptRegistry, ResponseCache, TrafficSplit, two_proportion_z
from lmforge.errors import LmforgeError


@pytest.fixture()
def db(tmp_path):
    d = open_database(tmp_path / "a.db")
    yield d
    d.close()


def test_versions_are_kept_and_never_edited(db):
    registry = PromptRegistry(db)
    assert registry.publish("support", "Be brief.") == "support@1"
    assert registry.publish("support", "Be brief.") == "support@1"  # same text: no new version
    assert registry.publish("support", "Be brief. Cite the page.", note="citations") == "support@2"
    assert registry.text("support@1") == "Be brief." and registry.versions("support") == ["support@1", "support@2"]
    with pytest.raises(LmforgeError, match="no prompt support@3"):
        registry.text("support@3")
    with pytest.raises(LmforgeError, match="NAME@VERSION"):
        registry.text("support")


def test_assignment_is_sticky_and_follows_the_weights():
    split = TrafficSplit({"support@1": 3, "support@2": 1})
    ids = [f"conversation-{n}" for n in range(4000)]
    first = [split.assign(i) for i in ids]
    assert first == [split.assign(i) for i in ids]
    share = first.count("support@1") / len(ids)
    assert abs(share - 0.75) < 3 * math.sqrt(0.75 * 0.25 / len(ids))  # within three standard errors
    assert TrafficSplit({"a@1": 1, "b@1": 0}).assign("x") == "a@1"
    with pytest.raises(LmforgeError):
        TrafficSplit({"a@1": -1})


def test_results_per_variant_with_a_significance_test(db):
    registry, store = PromptRegistry(db), ConversationStore(db)
    for n in range(40):
        variant = "support@1" if n % 2 else "support@2"
        conv = store.start(variant=variant)
        store.add(conv, "user", "question")
        answer = store.add(conv, "assistant", "answer")
        good = variant == "support@2" or n % 4 == 1  # v2 always up, v1 half the time
        store.rate(conv, answer, 1 if good else -1)
        if not good:
            store.request_handoff(conv, "unhappy")
    results = registry.results()
    assert results["support@2"]["up_rate"] == 1.0 and results["support@1"]["up_rate"] == 0.5
    assert results["support@1"]["handoff_rate"] == 0.5 and results["support@2"]["handoff_rate"] == 0.0
    assert results["support@1"]["messages_per_conversation"] == 2.0
    z, p = two_proportion_z(10, 20, 20, 20)
    assert results["support@1"]["up_rate_p"] == pytest.approx(p)
    # 10/20 vs 20/20: pooled 0.75, se sqrt(0.75 * 0.25 * 0.1) = 0.1369, z = -3.651
    assert z == pytest.approx(-0.5 / math.sqrt(0.75 * 0.25 * 0.1)) and p == pytest.approx(2.61e-4, rel=0.01)


def test_the_cache_answers_only_deterministic_requests():
    cache = ResponseCache(max_entries=2)
    messages = [{"role": "user", "content": "Do gift cards expire?"}]
    key = cache.key("smollm2", "support@1", messages, {"temperature": 0.0, "max_tokens": 64})
    assert cache.key("smollm2", "support@1", messages, {"temperature": 0.7}) is None
    assert key != cache.key("smollm2", "support@2", messages, {"temperature": 0.0, "max_tokens": 64})
    assert cache.get(key) is None
    cache.put(key, "They never expire.")
    assert cache.get(key) == "They never expire." and (cache.hits, cache.misses) == (1, 1)
    cache.put("b", 1)
    cache.put("c", 2)  # evicts the least recently used (key)
    assert cache.get(key) is None and len(cache) == 2
