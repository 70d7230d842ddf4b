"""The demo store's orders database: the same answers from SQLite and PostgreSQL."""

from __future__ import annotations

import pytest

from lmforge.assistant.db import open_database
from lmforge.assistant.orders import DemoSize, OrderStore, normalize_order_id
from lmforge.errors import LmforgeError

SMALL = DemoSize(customers=40, orders=150)


@pytest.fixture(scope="module")
def sqlite_store(tmp_path_factory):
    store = OrderStore(open_database(tmp_path_factory.mktemp("shop") / "store.db"))
    counts = store.seed_demo(seed=0, size=SMALL)
    assert counts["orders"] == 150 and counts["customers"] == 40
    yield store
    store.db.close()


def test_order_ids_in_customer_spellings():
    assert normalize_order_id("where is my order #a10042?") == "A10042"
    assert normalize_order_id("A-10042") == "A10042"
    assert normalize_order_id("order 1234") is None


def test_look_ups_answer_from_the_tables(sqlite_store):
    shipped = sqlite_store.order_ids("shipped")
    delivered = sqlite_store.order_ids("delivered")
    assert shipped and delivered and len(sqlite_store.order_ids()) == 150
    status = sqlite_store.get_order_status(shipped[0].lower())
    assert status["found"] and status["order_id"] == shipped[0] and status["status"] == "shipped"
    assert status["shipment"]["carrier"] in ("UPS", "DHL", "USPS") and status["shipment"]["delivered_on"] is None
    assert status["items"] and status["total"] == pytest.approx(sum(i["quantity"] * i["price"] for i in status["items"]))
    done = sqlite_store.get_order_status(delivered[0])
    assert done["shipment"]["delivered_on"] >= done["shipment"]["shipped_on"] >= done["placed_on"]
    # nothing about the customer leaves the store through a look-up
    assert "@" not in repr(status) and "customer" not in repr(status)


def test_unknown_and_malformed_ids_are_answers_not_errors(sqlite_store):
    assert sqlite_store.get_order_status("A99999") == {"found": False, "order_id": "A99999",
                                                        "error": "no order with this id"}
    bad = sqlite_store.get_order_status("'; DROP TABLE orders; --")
    assert bad["found"] is False and "invalid order id" in bad["error"]
    assert len(sqlite_store.order_ids()) == 150
    assert sqlite_store.orders_of("not an email")["found"] is False


def test_orders_of_a_customer_newest_first(sqlite_store):
    email = sqlite_store.db.query("SELECT c.email FROM customers c JOIN orders o ON o.customer_id = c.id LIMIT 1")[0]
    found = sqlite_store.orders_of(email["email"].upper())
    dates = [o["placed_on"] for o in found["orders"]]
    assert found["found"] and dates == sorted(dates, reverse=True)


def test_seeding_twice_is_refused(sqlite_store):
    with pytest.raises(LmforgeError, match="already holds orders"):
        sqlite_store.seed_demo()


def test_a_failed_transaction_leaves_nothing(tmp_path):
    db = open_database(tmp_path / "t.db")
    db.schema("CREATE TABLE t (id {serial}, x TEXT NOT NULL)")
    with pytest.raises(LmforgeError, match="database error"):
        with db.transaction() as cur:
            assert cur.insert("INSERT INTO t (x) VALUES (?)", ("kept?",)) == 1
            cur.execute("INSERT INTO t (x) VALUES (?)", (None,))
    assert db.query("SELECT COUNT(*) AS n FROM t") == [{"n": 0}]


def test_postgres_gives_the_same_answers(postgres_url, sqlite_store):
    import psycopg

    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("DROP SCHEMA IF EXISTS shop CASCADE")
        conn.execute("CREATE SCHEMA shop")
    separator = "&" if "?" in postgres_url else "?"
    url = f"{postgres_url}{separator}options=-csearch_path%3Dshop"
    store = OrderStore(open_database(url))
    try:
        store.seed_demo(seed=0, size=SMALL)
        ids = sqlite_store.order_ids()
        assert store.order_ids() == ids
        for order_id in ids[::10] + ["A99999", "nonsense"]:
            assert store.get_order_status(order_id) == sqlite_store.get_order_status(order_id)
        db = store.db
        db.schema("CREATE TABLE t (id {serial}, x TEXT NOT NULL)")
        with db.transaction() as cur:
            assert cur.insert("INSERT INTO t (x) VALUES (?)", ("a",)) == 1
            assert cur.insert("INSERT INTO t (x) VALUES (?)", ("b",)) == 2
    finally:
        store.db.close()
