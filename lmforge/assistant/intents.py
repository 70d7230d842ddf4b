"""Generated customer messages with their intents, for training and testing the intent router.

    splits = make_intent_dataset(seed=0)        # {"train": [...], "validation": [...], "test": [...]}
    splits["test"][0]  # {"text": "yo where's my stuff, order A10233", "label": "order_status", ...}

The router in front of the assistant sends each message to a handler by its intent:

    faq               a question the store's knowledge base answers (shipping, returns, payments,
                      products, warranty, account, contact, gift cards); ``page`` names the page
    order_status      where is / what happened to a specific order (usually with an order id)
    refund_complaint  a refund, a return of a bad item, a complaint about an order
    handoff           the customer asks for a human
    chit_chat         greetings, thanks, small talk
    out_of_scope      anything the store cannot help with (weather, homework, other companies)
    abuse             insults and threats aimed at the assistant or staff

Messages are templates with slots (order ids, products, carriers, feelings, ...) written in
several registers: polite, terse, angry, lower case, with typos. The split is by TEMPLATE,
not by message: every template belongs to exactly one split (about 60% train, 20%
validation, 20% test, chosen by a seeded shuffle within each intent), so a test message is
phrased in a way the router never saw in training, which is what a router meets in
production. The validation split is where thresholds are calibrated.
"""

from __future__ import annotations

import random
from typing import Any

from ..errors import LmforgeError

INTENTS = ("faq", "order_status", "refund_complaint", "handoff", "chit_chat", "out_of_scope", "abuse")
SPLITS = ("train", "validation", "test")
SPLIT_SHARES = (0.6, 0.2, 0.2)

_PRODUCTS = ["floor lamp", "desk lamp", "pendant light", "table lamp", "duvet cover", "throw blanket", "towel set",
             "rug", "dinner plates", "skillet", "storage jars", "cutting board", "vase", "mirror", "candles", "print"]
_CARRIERS = ["UPS", "DHL", "USPS", "the courier", "the carrier"]
_PROBLEMS = ["arrived broken", "arrived cracked", "is the wrong colour", "is not what I ordered", "stopped working",
             "was missing a part", "came scratched", "smells weird", "is much smaller than the photos"]
_TOPICS_OUT = ["the weather tomorrow", "the capital of Australia", "my calculus homework", "a good pasta recipe",
               "the football score", "how to fix my car", "bitcoin prices", "a poem about cats",
               "my tax return", "the latest iPhone", "flights to Lisbon", "learning Python"]

# FAQ templates carry the knowledge-base page that answers them
_FAQ: list[tuple[str, str]] = [
    ("How long does standard shipping take?", "shipping"),
    ("do you ship to {country}?", "shipping"),
    ("How much is express delivery?", "shipping"),
    ("Is shipping free over a certain amount?", "shipping"),
    ("which carriers do you use", "shipping"),
    ("Can I change my delivery address after ordering?", "shipping"),
    ("my tracking number shows nothing yet, is that normal?", "shipping"),
    ("Do I pay import duties if I order from {country}?", "shipping"),
    ("What is your return policy?", "returns"),
    ("how many days do I have to return a {product}?", "returns"),
    ("Can I return {product} I already used?", "returns"),
    ("Who pays for the return label?", "returns"),
    ("How long until I get my money back after a return?", "returns"),
    ("do you do exchanges?", "returns"),
    ("Can I cancel an order before it ships?", "returns"),
    ("Can I return candles?", "returns"),
    ("What payment methods do you take?", "payments"),
    ("do u accept paypal", "payments"),
    ("Can I pay with Apple Pay?", "payments"),
    ("When will my card be charged?", "payments"),
    ("Do prices include VAT?", "payments"),
    ("The {product} went on sale after I bought it, can I get the difference?", "payments"),
    ("Can I get an invoice with my company name?", "payments"),
    ("What bulbs does the {lamp} take?", "products"),
    ("how do I wash the linen duvet cover", "products"),
    ("Is the skillet OK on induction?", "products"),
    ("Are the stoneware plates dishwasher safe?", "products"),
    ("how long does the rechargeable lamp battery last?", "products"),
    ("When will the {product} be back in stock?", "products"),
    ("do you take pre-orders", "products"),
    ("How long is the warranty on a {lamp}?", "warranty"),
    ("Does the warranty cover bulbs?", "warranty"),
    ("how do I make a warranty claim", "warranty"),
    ("Is there a warranty on textiles?", "warranty"),
    ("How do I reset my password?", "account"),
    ("Do I need an account to order?", "account"),
    ("how do i unsubscribe from your emails", "account"),
    ("Can you delete my personal data?", "account"),
    ("Do you sell my data?", "account"),
    ("What are your support hours?", "contact"),
    ("do you have a phone number", "contact"),
    ("Can I pick up my order at your warehouse?", "contact"),
    ("Do you have a shop in {city}?", "contact"),
    ("Do gift cards expire?", "gift-cards"),
    ("Can I use two promo codes on one order?", "gift-cards"),
    ("I lost my gift card code, what now?", "gift-cards"),
    ("when are your sales", "gift-cards"),
    ("Can I add a discount code after ordering?", "gift-cards"),
]
_ORDER_STATUS = [
    "Where is my order {order}?",
    "where's my stuff? order {order}",
    "Can you check the status of order {order} please",
    "Has order {order} shipped yet?",
    "my {product} still hasn't arrived, order number {order}",
    "Tracking for {order}?",
    "When will order {order} be delivered?",
    "I ordered a {product} last week ({order}), any update?",
    "order {order} status",
    "is {order} out for delivery",
    "Hi, could you tell me what's happening with my order {order}? Thanks",
    "{carrier} says nothing about my parcel, order {order}",
    "has my order been sent? the number is {order}",
    "What's the ETA on {order}",
    "I placed order {order} on Monday, when does it ship?",
    "Did you receive my payment for order {order}?",
    "whre is my ordr {order}",
    "Where is my order?",
    "I want to know where my package is",
    "check my order {order} pls",
]
_REFUND = [
    "My {product} {problem}, I want a refund. Order {order}.",
    "I'd like to return the {product} from order {order}",
    "The {product} {problem}. What are you going to do about it?",
    "Still waiting for my refund on {order}, it's been two weeks!",
    "I want my money back for order {order}",
    "this is unacceptable, the {product} {problem}",
    "How do I send back the {product}? It {problem}.",
    "Can I get a refund for {order}? The {product} {problem}",
    "I was charged twice for order {order}",
    "You sent me the wrong item in order {order}",
    "refund status for {order}?",
    "I need to return something, order {order}",
    "worst service ever, my {product} {problem} and nobody answers",
    "i want to complain about my delivery, {carrier} left the box in the rain",
    "The parcel says delivered but I never got it, order {order}",
    "please cancel order {order} and refund me",
    "Your {product} {problem}. I'm really disappointed.",
    "I returned the {product} ten days ago and still no refund",
]
_HANDOFF = [
    "I want to talk to a human",
    "Can I speak to a real person please?",
    "get me an agent",
    "transfer me to customer service",
    "I don't want a bot, give me a person",
    "Is there a human I can talk to?",
    "connect me with support staff",
    "let me talk to your manager",
    "human please",
    "Can someone from your team call me back?",
    "I need a real agent for this, the bot isn't helping",
    "operator",
    "put me through to a representative",
    "I'd rather chat with a live agent",
    "Please escalate this to a person",
]
_CHIT_CHAT = [
    "hi",
    "Hello there!",
    "good morning",
    "thanks, that's all",
    "Thank you so much!",
    "how are you today?",
    "you're very helpful",
    "ok cool",
    "bye",
    "Are you a robot?",
    "what's your name?",
    "have a nice day",
    "lol ok",
    "Hey, quick question",
    "cheers mate",
    "nice, thanks for the help",
]
_OUT_OF_SCOPE = [
    "What's {topic}?",
    "Can you help me with {topic}?",
    "tell me about {topic}",
    "I need advice on {topic}",
    "Do you know anything about {topic}?",
    "write me something about {topic}",
    "What do you think about {topic}?",
    "Can you explain {topic} to me",
    "Is Amazon cheaper than you?",
    "Where can I buy a sofa from IKEA?",
    "Who will win the election?",
    "book me a table for two tonight",
    "What's the meaning of life?",
    "Can you order me a pizza?",
    "translate 'good night' into French",
    "how do I get a mortgage",
]
_ABUSE = [
    "you are a useless piece of junk",
    "shut up, stupid bot",
    "your company is run by idiots",
    "I'm going to find your staff and hurt them",
    "you're the dumbest assistant I've ever used, moron",
    "go to hell",
    "f*** you and your lamps",
    "i hope your warehouse burns down",
    "you worthless scammers",
    "I will make your life miserable, idiot",
    "stupid machine, answer me properly you clown",
    "your support people are pathetic losers",
    "I know where your office is, watch out",
    "idiot bot",
]
_TEMPLATES: dict[str, list[Any]] = {
    "faq": _FAQ, "order_status": _ORDER_STATUS, "refund_complaint": _REFUND, "handoff": _HANDOFF,
    "chit_chat": _CHIT_CHAT, "out_of_scope": _OUT_OF_SCOPE, "abuse": _ABUSE,
}
_COUNTRIES = ["Canada", "Germany", "the UK", "France", "Spain", "Ireland", "the Netherlands", "Italy"]
_CITIES = ["Chicago", "Toronto", "London", "Berlin", "Columbus", "Paris"]
_LAMPS = ["floor lamp", "desk lamp", "pendant light", "table lamp"]


_OPENERS = ["", "", "", "", "", "Hi, ", "Hello! ", "hey ", "Excuse me, ", "Quick question: ", "Good evening. "]
_CLOSERS = ["", "", "", "", "", " Thanks!", " thank you", " please", " asap", " :)", " Regards, Sam"]


def _order_id(rng: random.Random) -> str:
    return f"A{rng.randint(10001, 11200)}" if rng.random() < 0.9 else f"A{rng.randint(20000, 99999)}"


def _fill(template: str, rng: random.Random) -> str:
    slots = {"order": _order_id(rng), "product": rng.choice(_PRODUCTS), "problem": rng.choice(_PROBLEMS),
             "carrier": rng.choice(_CARRIERS), "topic": rng.choice(_TOPICS_OUT), "country": rng.choice(_COUNTRIES),
             "city": rng.choice(_CITIES), "lamp": rng.choice(_LAMPS)}
    text = template.format(**slots)
    opener, closer = rng.choice(_OPENERS), rng.choice(_CLOSERS)
    if opener and text[:1].isupper() and not text.startswith("I "):
        text = text[0].lower() + text[1:]
    text = f"{opener}{text}{closer}"
    style = rng.random()
    if style < 0.12:
        text = text.lower()
    elif style < 0.18:
        text = text.rstrip("?.!") + "??"
    elif style < 0.22 and len(text) > 12:  # one dropped letter: real messages have typos
        cut = rng.randrange(1, len(text) - 1)
        if text[cut].isalpha():
            text = text[:cut] + text[cut + 1:]
    return text


def template_splits(seed: int = 0) -> dict[str, dict[str, list[int]]]:
    """Per intent, which template indices belong to which split (a seeded shuffle, 60/20/20)."""
    out: dict[str, dict[str, list[int]]] = {}
    for intent in INTENTS:
        n = len(_TEMPLATES[intent])
        order = list(range(n))
        random.Random(f"{seed}:templates:{intent}").shuffle(order)
        n_val = max(1, round(n * SPLIT_SHARES[1]))
        n_test = max(1, round(n * SPLIT_SHARES[2]))
        out[intent] = {"test": sorted(order[:n_test]), "validation": sorted(order[n_test:n_test + n_val]),
                       "train": sorted(order[n_test + n_val:])}
    return out


def make_intent_dataset(seed: int = 0, per_intent: dict[str, int] | None = None) -> dict[str, list[dict[str, Any]]]:
    """Messages per split, ``per_intent[split]`` of each intent (defaults: 150 / 40 / 60), unique texts."""
    sizes = {"train": 150, "validation": 40, "test": 60, **(per_intent or {})}
    if any(v < 0 for v in sizes.values()) or set(sizes) != set(SPLITS):
        raise LmforgeError(f"per_intent needs non-negative sizes for {', '.join(SPLITS)}")
    splits = template_splits(seed)
    rng = random.Random(f"{seed}:intents")
    out: dict[str, list[dict[str, Any]]] = {s: [] for s in SPLITS}
    seen: set[str] = set()
    for split in SPLITS:
        for intent in INTENTS:
            templates = [(i, _TEMPLATES[intent][i]) for i in splits[intent][split]]
            made, tries = 0, 0
            while made < sizes[split] and tries < sizes[split] * 50:
                tries += 1
                index, template = rng.choice(templates)
                text_template, page = template if isinstance(template, tuple) else (template, None)
                text = _fill(text_template, rng)
                if text in seen:
                    continue
                seen.add(text)
                record = {"text": text, "label": intent, "template": f"{intent}/{index}"}
                if page:
                    record["page"] = page
                out[split].append(record)
                made += 1
        rng.shuffle(out[split])
    return out


def write_intent_dataset(out, seed: int = 0, per_intent: dict[str, int] | None = None) -> dict[str, Any]:
    """``out/{train,validation,test}.jsonl`` (records ``{"text", "label", ...}``, the layout
    ``lmforge finetune classify`` reads) and ``out/dataset.json`` with counts per intent."""
    from lmforge.tune.datasets import write_splits

    splits = make_intent_dataset(seed, per_intent)
    counts = {s: {i: sum(r["label"] == i for r in rows) for i in INTENTS} for s, rows in splits.items()}
    info = {"name": "intents", "seed": seed, "labels": list(INTENTS), "counts": counts,
            "split": "by template: a test message's template never appears in training",
            "source": "generated by lmforge.assistant.intents (templates and slots written for the demo store)"}
    return write_splits(splits, out, info)
