"""The demo store's orders database and the read-only look-ups the assistant's tools call.

    store = OrderStore(open_database("runs/assistant/store.db"))
    store.seed_demo(seed=0)                     # 300 customers, 1,200 orders, deterministic
    store.get_order_status("A10042")            # {"found": True, "status": "shipped", ...}

The assistant answers order questions by calling `get_order_status(order_id)` and its
relatives, never by letting the model write SQL: each look-up is one parameterised query
with a validated argument, returns only what a customer may see about that order (no
names, emails or addresses of anybody), and cannot change anything. Those are the
functions the assistant's tools wrap (least privilege: read-only by construction).

The demo store ("Lumen & Loom", home goods) is generated from a seed: customers, a
catalogue, orders with items, shipments with carriers and tracking numbers, and refunds,
with dates relative to a fixed store date so that "expected on" and "delivered on" answers
are reproducible. Statuses follow an order's life: placed -> paid -> packed -> shipped ->
delivered, or cancelled; a delivered order may have a return and a refund.
"""

from __future__ import annotations

import datetime as dt
import random
import re
from dataclasses import dataclass
from typing import Any

from ..errors import LmforgeError
from .db import Database

ORDER_ID = re.compile(r"^[A-Z]\d{5}$")
_LOOSE_ID = re.compile(r"#?\s*([A-Za-z])[-\s]?(\d{5})\b")
STORE_NAME = "Lumen & Loom"
STORE_DATE = dt.date(2026, 11, 20)  # "today" for the generated data
STATUSES = ("placed", "paid", "packed", "shipped", "delivered", "cancelled")
CARRIERS = {"UPS": "1Z{:016d}", "DHL": "JD{:018d}", "USPS": "9400{:018d}"}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS customers (
    id    TEXT PRIMARY KEY,
    name  TEXT NOT NULL,
    email TEXT NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS products (
    sku      TEXT PRIMARY KEY,
    name     TEXT NOT NULL,
    category TEXT NOT NULL,
    price    DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS orders (
    id          TEXT PRIMARY KEY,
    customer_id TEXT NOT NULL REFERENCES customers (id),
    status      TEXT NOT NULL,
    placed_on   TEXT NOT NULL,
    total       DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS orders_customer ON orders (customer_id);
CREATE TABLE IF NOT EXISTS order_items (
    order_id TEXT NOT NULL REFERENCES orders (id),
    sku      TEXT NOT NULL REFERENCES products (sku),
    quantity INTEGER NOT NULL,
    price    DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (order_id, sku)
);
CREATE TABLE IF NOT EXISTS shipments (
    order_id     TEXT PRIMARY KEY REFERENCES orders (id),
    carrier      TEXT NOT NULL,
    tracking     TEXT NOT NULL,
    shipped_on   TEXT NOT NULL,
    expected_on  TEXT NOT NULL,
    delivered_on TEXT
);
CREATE TABLE IF NOT EXISTS refunds (
    order_id     TEXT PRIMARY KEY REFERENCES orders (id),
    amount       DOUBLE PRECISION NOT NULL,
    status       TEXT NOT NULL,
    requested_on TEXT NOT NULL,
    reason       TEXT NOT NULL
)
"""

_CATALOGUE = {
    "lamps": ["Arc floor lamp", "Brass desk lamp", "Paper pendant light", "Rechargeable table lamp"],
    "textiles": ["Linen duvet cover", "Wool throw blanket", "Cotton bath towel set", "Jute area rug"],
    "kitchen": ["Stoneware dinner plates (4)", "Cast iron skillet", "Glass storage jars (6)", "Oak cutting board"],
    "decor": ["Ceramic vase", "Wall mirror, round", "Scented candle trio", "Framed botanical print"],
}
_FIRST = ["Ana", "Ben", "Chloe", "Dmitri", "Elif", "Farah", "Gabriel", "Hana", "Isaac", "Julia", "Kenji", "Lucia",
          "Mateo", "Nadia", "Omar", "Priya", "Quentin", "Rosa", "Sven", "Tariq", "Uma", "Victor", "Wen", "Yara"]
_LAST = ["Alvarez", "Brown", "Chen", "Dubois", "Evans", "Fischer", "Garcia", "Haddad", "Ivanova", "Jensen", "Kim",
         "Lopez", "Moreau", "Novak", "Okafor", "Patel", "Rossi", "Schmidt", "Tanaka", "Weber"]
_REFUND_REASONS = ["arrived damaged", "wrong item", "changed my mind", "not as described", "late delivery"]


@dataclass(frozen=True)
class DemoSize:
    customers: int = 300
    orders: int = 1200


def normalize_order_id(text: str) -> str | None:
    """The canonical order id ("A10042") in a customer's spelling ("#a10042", "A-10042"), or None."""
    match = _LOOSE_ID.search(text or "")
    return f"{match.group(1).upper()}{match.group(2)}" if match else None


def _day(d: dt.date) -> str:
    return d.isoformat()


class OrderStore:
    """The orders tables of a `Database`, with the read-only look-ups tools call."""

    def __init__(self, db: Database) -> None:
        self.db = db
        db.schema(_SCHEMA)

    # -- the demo data -----------------------------------------------------------------------------

    def seed_demo(self, seed: int = 0, size: DemoSize = DemoSize()) -> dict[str, int]:
        """Fill an empty store with the generated demo data (refused when it holds orders)."""
        if self.db.query("SELECT COUNT(*) AS n FROM orders")[0]["n"]:
            raise LmforgeError("the store already holds orders; seed an empty database")
        rng = random.Random(f"{seed}:store")
        products = []
        for category, names in _CATALOGUE.items():
            for k, name in enumerate(names):
                products.append((f"{category[:3].upper()}-{k + 1:03d}", name, category,
                                 rng.randint(9, 239) + 0.99))
        customers, emails = [], set()
        while len(customers) < size.customers:
            first, last = rng.choice(_FIRST), rng.choice(_LAST)
            email = f"{first.lower()}.{last.lower()}{rng.randint(1, 99)}@example.com"
            if email not in emails:
                emails.add(email)
                customers.append((f"C{len(customers) + 1:05d}", f"{first} {last}", email))
        orders, items, shipments, refunds = [], [], [], []
        for n in range(size.orders):
            order_id = f"A{10001 + n}"
            placed = STORE_DATE - dt.timedelta(days=rng.randint(0, 90))
            age = (STORE_DATE - placed).days
            roll = rng.random()
            if roll < 0.04:
                status = "cancelled"
            elif age <= 1:
                status = rng.choice(["placed", "paid"])
            elif age <= 3:
                status = rng.choice(["paid", "packed", "shipped"])
            elif age <= 9:
                status = rng.choice(["shipped", "shipped", "delivered"])
            else:
                status = "delivered" if roll > 0.07 else "shipped"  # a few stuck in transit
            chosen = rng.sample(products, rng.randint(1, 3))
            lines = [(sku, rng.randint(1, 2), price) for sku, _, _, price in chosen]
            total = round(sum(q * p for _, q, p in lines), 2)
            orders.append((order_id, rng.choice(customers)[0], status, _day(placed), total))
            items += [(order_id, sku, q, p) for sku, q, p in lines]
            if status in ("shipped", "delivered"):
                carrier = rng.choice(sorted(CARRIERS))
                shipped = placed + dt.timedelta(days=rng.randint(1, 2))
                expected = shipped + dt.timedelta(days=rng.randint(2, 6))
                delivered = min(expected + dt.timedelta(days=rng.randint(-1, 2)), STORE_DATE) \
                    if status == "delivered" else None
                shipments.append((order_id, carrier, CARRIERS[carrier].format(rng.randrange(10 ** 15)),
                                  _day(shipped), _day(expected), _day(delivered) if delivered else None))
                if delivered and rng.random() < 0.08:
                    requested = delivered + dt.timedelta(days=rng.randint(1, 10))
                    refunds.append((order_id, total, "refunded" if requested < STORE_DATE - dt.timedelta(days=5)
                                    else "pending", _day(min(requested, STORE_DATE)), rng.choice(_REFUND_REASONS)))
        with self.db.transaction() as cur:
            cur.executemany("INSERT INTO products (sku, name, category, price) VALUES (?, ?, ?, ?)", products)
            cur.executemany("INSERT INTO customers (id, name, email) VALUES (?, ?, ?)", customers)
            cur.executemany("INSERT INTO orders (id, customer_id, status, placed_on, total) VALUES (?, ?, ?, ?, ?)",
                            orders)
            cur.executemany("INSERT INTO order_items (order_id, sku, quantity, price) VALUES (?, ?, ?, ?)", items)
            cur.executemany("INSERT INTO shipments (order_id, carrier, tracking, shipped_on, expected_on, "
                            "delivered_on) VALUES (?, ?, ?, ?, ?, ?)", shipments)
            cur.executemany("INSERT INTO refunds (order_id, amount, status, requested_on, reason) "
                            "VALUES (?, ?, ?, ?, ?)", refunds)
        return {"customers": len(customers), "products": len(products), "orders": len(orders),
                "shipments": len(shipments), "refunds": len(refunds)}

    # -- look-ups (what tools call) ----------------------------------------------------------------

    def get_order_status(self, order_id: str) -> dict[str, Any]:
        """What a customer may know about one order: status, dates, items, shipment, refund."""
        canonical = normalize_order_id(order_id) if isinstance(order_id, str) else None
        if canonical is None or not ORDER_ID.match(canonical):
            return {"found": False, "error": "invalid order id: order ids look like A10042 (a letter and 5 digits)"}
        with self.db.transaction() as cur:
            rows = cur.query("SELECT id, status, placed_on, total FROM orders WHERE id = ?", (canonical,))
            if not rows:
                return {"found": False, "order_id": canonical, "error": "no order with this id"}
            order = rows[0]
            items = cur.query("SELECT p.name, i.quantity, i.price FROM order_items i JOIN products p "
                              "ON p.sku = i.sku WHERE i.order_id = ? ORDER BY p.name", (canonical,))
            shipment = cur.query("SELECT carrier, tracking, shipped_on, expected_on, delivered_on FROM shipments "
                                 "WHERE order_id = ?", (canonical,))
            refund = cur.query("SELECT amount, status, requested_on FROM refunds WHERE order_id = ?", (canonical,))
        return {"found": True, "order_id": order["id"], "status": order["status"], "placed_on": order["placed_on"],
                "total": round(float(order["total"]), 2),
                "items": [{"name": i["name"], "quantity": int(i["quantity"]), "price": round(float(i["price"]), 2)}
                          for i in items],
                "shipment": shipment[0] if shipment else None,
                "refund": ({**refund[0], "amount": round(float(refund[0]["amount"]), 2)} if refund else None)}

    def orders_of(self, email: str, limit: int = 5) -> dict[str, Any]:
        """The newest orders of the customer with this email (ids, dates, statuses, totals)."""
        email = (email or "").strip().lower()
        if not re.fullmatch(r"[^@\s]{1,64}@[^@\s]{1,255}", email):
            return {"found": False, "error": "invalid email address"}
        rows = self.db.query("SELECT o.id, o.status, o.placed_on, o.total FROM orders o JOIN customers c "
                             "ON c.id = o.customer_id WHERE c.email = ? ORDER BY o.placed_on DESC, o.id DESC LIMIT ?",
                             (email, int(limit)))
        return {"found": bool(rows), "orders": [{"order_id": r["id"], "status": r["status"],
                                                 "placed_on": r["placed_on"], "total": round(float(r["total"]), 2)}
                                                for r in rows]}

    def order_ids(self, status: str | None = None) -> list[str]:
        """Every order id (optionally of one status), for generating questions about real orders."""
        if status is None:
            return [r["id"] for r in self.db.query("SELECT id FROM orders ORDER BY id")]
        return [r["id"] for r in self.db.query("SELECT id FROM orders WHERE status = ? ORDER BY id", (status,))]


# JSON Schemas of the look-ups, for the tools that expose them to a model
GET_ORDER_STATUS_SCHEMA = {
    "type": "object",
    "properties": {"order_id": {"type": "string", "maxLength": 6,
                                "description": "the order id, a letter and 5 digits, e.g. A10042"}},
    "required": ["order_id"],
    "additionalProperties": False,
}
ORDERS_OF_SCHEMA = {
    "type": "object",
    "properties": {"email": {"type": "string", "maxLength": 254, "description": "the customer's email address"}},
    "required": ["email"],
    "additionalProperties": False,
}
