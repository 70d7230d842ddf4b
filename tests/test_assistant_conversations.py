"""Conversations, hand-offs and the feedback flywheel in the assistant's database."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lmforge.assistant.conversations import ConversationStore
from lmforge.assistant.db import open_database
from lmforge.errors import LmforgeError


@pytest.fixture()
def store(tmp_path):
    s = ConversationStore(open_database(tmp_path / "assistant.db"))
    yield s
    s.db.close()


def test_a_hand_off_moves_the_conversation_to_an_agent_and_back(store):
    conv = store.start(variant="v1")
    store.add(conv, "user", "my lamp arrived broken", intent="refund_complaint")
    store.add(conv, "assistant", "Sorry to hear that. Could you share the order id?")
    store.add(conv, "user", "I want a person")
    ticket = store.request_handoff(conv, "customer asked for a person")
    assert store.request_handoff(conv, "again") == ticket  # one open ticket per conversation
    assert store.state(conv) == "waiting"
    assert [t["id"] for t in store.queue()] == [ticket] and store.queue()[0]["last_message"] == "I want a person"
    store.take(ticket, "maria")
    assert store.state(conv) == "human" and store.queue() == []
    with pytest.raises(LmforgeError, match="taken by maria"):
        store.take(ticket, "li")
    store.add(conv, "agent", "Hi, Maria here. I have sent a replacement.", author="maria")
    store.resolve(ticket, "replacement sent", back_to_bot=True)
    assert store.state(conv) == "bot"
    with pytest.raises(LmforgeError, match="already resolved"):
        store.resolve(ticket, "twice")
    sft, pairs = store.flywheel()
    assert pairs == [] and len(sft) == 1
    assert sft[0]["messages"] == [
        {"role": "user", "content": "my lamp arrived broken\nI want a person"},
        {"role": "assistant", "content": "Hi, Maria here. I have sent a replacement."}]


def test_corrections_and_thumbs_become_training_records(store):
    conv = store.start()
    store.add(conv, "system", "You are the store's assistant.")
    store.add(conv, "user", "Do gift cards expire?")
    answer = store.add(conv, "assistant", "Yes, after one year.")
    store.add(conv, "user", "And can I use two promo codes?")
    good = store.add(conv, "assistant", "One promotion code per order.")
    store.rate(conv, answer, -1, correction="No, our gift cards never expire.", author="li")
    store.rate(conv, good, 1)
    sft, pairs = store.flywheel()
    assert pairs == [{"prompt": "Do gift cards expire?", "chosen": "No, our gift cards never expire.",
                      "rejected": "Yes, after one year.",
                      "context": [{"role": "system", "content": "You are the store's assistant."}],
                      "source": f"assistant correction (conversation {conv}, message {answer})"}]
    assert [r["messages"][-1]["content"] for r in sft] == ["No, our gift cards never expire.",
                                                           "One promotion code per order."]
    assert sft[1]["messages"][2] == {"role": "assistant", "content": "Yes, after one year."}
    from lmforge.align.preference_data import validate_records
    from lmforge.tune.sft_data import messages_of

    validate_records(pairs)
    for record in sft:
        messages_of(record, "flywheel record")


def test_bad_input_is_refused(store):
    conv = store.start()
    user = store.add(conv, "user", "hello")
    with pytest.raises(LmforgeError, match="only assistant answers"):
        store.rate(conv, user, 1)
    with pytest.raises(LmforgeError, match="role must be"):
        store.add(conv, "root", "x")
    with pytest.raises(LmforgeError, match="no conversation"):
        store.add("nope", "user", "x")
    with pytest.raises(LmforgeError, match="rating must be"):
        store.rate(conv, 0, 5)


def test_rows_survive_the_process_being_killed(tmp_path):
    path = tmp_path / "killed.db"
    script = (
        "import os, signal\n"
        "from lmforge.assistant.conversations import ConversationStore\n"
        "from lmforge.assistant.db import open_database\n"
        f"s = ConversationStore(open_database({str(path)!r}))\n"
        "for n in range(20):\n"
        "    c = s.start(conversation_id=f'c{n}')\n"
        "    s.add(c, 'user', 'hi')\n"
        "    i = s.add(c, 'assistant', 'hello')\n"
        "    s.rate(c, i, 1)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == -9, done.stderr
    reopened = ConversationStore(open_database(path))
    counts = reopened.counts()
    assert counts["bot"] == 20 and counts["messages"] == 40 and counts["ratings"] == 20


def test_postgres_holds_the_same_conversations(postgres_url):
    import psycopg

    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("DROP SCHEMA IF EXISTS conv CASCADE")
        conn.execute("CREATE SCHEMA conv")
    separator = "&" if "?" in postgres_url else "?"
    store = ConversationStore(open_database(f"{postgres_url}{separator}options=-csearch_path%3Dconv"))
    try:
        conv = store.start()
        store.add(conv, "user", "where is A10001?")
        idx = store.add(conv, "assistant", "It shipped.")
        store.rate(conv, idx, -1, correction="It was delivered on 2026-11-04.")
        ticket = store.request_handoff(conv, "unsure")
        store.take(ticket, "maria")
        store.resolve(ticket, "answered")
        assert store.counts() == {"bot": 0, "waiting": 0, "human": 0, "closed": 1, "messages": 2, "ratings": 1,
                                  "handoffs": 1}
        sft, pairs = store.flywheel()
        assert pairs[0]["chosen"] == "It was delivered on 2026-11-04." and len(sft) == 1
    finally:
        store.db.close()
