"""Generated customer-service questions by topic: traffic to test monitors on.

A drift detector or a dashboard needs a stream of realistic questions whose topic mix is
known, so that an injected shift (a share of questions about a topic the reference never
saw) can be measured. Each topic has its own templates and slot values; greetings,
politeness and typos vary the surface so that no two windows are made of copies.
"""

from __future__ import annotations

import random
from typing import Sequence

from ..errors import LmforgeError

PRODUCTS = ["wireless earbuds", "laptop stand", "coffee grinder", "running shoes", "desk lamp", "phone case",
            "backpack", "blender", "smart watch", "yoga mat", "air fryer", "bluetooth speaker", "winter jacket",
            "office chair", "electric kettle", "gaming mouse"]
CARRIERS = ["UPS", "FedEx", "DHL", "the post office", "the courier"]
DAYS = ["two days", "a week", "ten days", "three weeks", "since Monday", "since last Friday"]
COUNTRIES = ["Canada", "Germany", "Japan", "Brazil", "Australia", "Mexico", "France"]
PLANS = ["Basic", "Plus", "Premium", "Family", "Business"]
DEVICES = ["iPhone", "Android phone", "tablet", "Windows laptop", "Mac", "smart TV"]
ERRORS = ["error 403", "a blank screen", "a spinning wheel", "'session expired'", "error 500", "a login loop"]

TOPICS: dict[str, list[str]] = {
    "shipping": [
        "Where is my order #{order}? It has been {days} and the {product} still has not arrived.",
        "My tracking number says the {product} is with {carrier} but nothing moved for {days}.",
        "Do you ship to {country}, and how long does delivery take?",
        "Can I change the delivery address for order #{order}?",
        "The package with my {product} was marked delivered but I never got it.",
        "How much does express shipping cost for a {product}?",
        "Why was my order #{order} split into two shipments?",
        "Can {carrier} leave the {product} at my door if I am not home?",
    ],
    "returns": [
        "How do I return the {product} I bought {days} ago?",
        "The {product} arrived broken, can I get a replacement?",
        "When will I get my refund for the returned {product}?",
        "Is return shipping free for order #{order}?",
        "I received the wrong size of {product}, how do I exchange it?",
        "Can I return a {product} without the original box?",
        "My refund for order #{order} has not shown up after {days}.",
        "What is your return window for a {product}?",
    ],
    "billing": [
        "I was charged twice for order #{order}, can you fix it?",
        "Why did my card get declined when I tried to buy the {product}?",
        "Can I pay for the {product} in installments?",
        "How do I get an invoice for order #{order}?",
        "My {plan} plan renewed but I was billed the wrong amount.",
        "Do you accept PayPal for orders to {country}?",
        "There is a charge I do not recognize from {days} ago.",
        "Can I use two gift cards on the same order?",
    ],
    "account": [
        "I forgot my password and the reset email never arrives.",
        "How do I change the email address on my account?",
        "How do I upgrade from the {plan} plan to a bigger one?",
        "Can I merge two accounts into one?",
        "How do I delete my account and all my data?",
        "My account is locked after too many login attempts on my {device}.",
        "How do I turn on two-factor authentication?",
        "Can I share my {plan} subscription with my family?",
    ],
    "technical": [
        "The app shows {error} when I open it on my {device}.",
        "My {product} will not pair with my {device}.",
        "The website keeps showing {error} at checkout.",
        "How do I update the firmware on my {product}?",
        "The {product} stopped charging after {days}.",
        "Notifications stopped working on my {device}.",
        "The app crashes on my {device} every time I open the order history.",
        "How do I reset the {product} to factory settings?",
    ],
    # A topic the reference traffic never contains: what an incident or a launch brings in.
    "privacy": [
        "Was my credit card number exposed in the data breach?",
        "I got an email about a security incident, is it real or phishing?",
        "Which of my personal data did the hackers get?",
        "Should I change my password because of the breach reported {days} ago?",
        "Will you pay for credit monitoring after the leak?",
        "Someone used my account to order a {product} after the breach, what do I do?",
        "Do you sell my browsing data to advertisers?",
        "How do I request a copy of all the data you store about me under GDPR?",
    ],
}
REFERENCE_TOPICS = ("shipping", "returns", "billing", "account", "technical")
SHIFT_TOPIC = "privacy"

_OPENERS = ["", "", "", "Hi, ", "Hello, ", "Hey there, ", "Good morning, ", "Quick question: "]
_CLOSERS = ["", "", "", " Thanks!", " Thank you.", " Please help.", " This is urgent.", " Any advice?"]


def _fill(template: str, rng: random.Random) -> str:
    return template.format(order=rng.randint(10000, 99999), product=rng.choice(PRODUCTS), days=rng.choice(DAYS),
                           carrier=rng.choice(CARRIERS), country=rng.choice(COUNTRIES), plan=rng.choice(PLANS),
                           device=rng.choice(DEVICES), error=rng.choice(ERRORS))


def question(topic: str, rng: random.Random) -> str:
    """One question about `topic`, with a random template, slots, greeting and closing."""
    if topic not in TOPICS:
        raise LmforgeError(f"unknown topic {topic!r} (known: {', '.join(TOPICS)})")
    text = _fill(rng.choice(TOPICS[topic]), rng)
    opener = rng.choice(_OPENERS)
    if opener:
        text = opener + text[0].lower() + text[1:] if not text.startswith("I ") else opener + text
    return text + rng.choice(_CLOSERS)


def questions(n: int, rng: random.Random, topics: Sequence[str] = REFERENCE_TOPICS,
              shift_share: float = 0.0, shift_topic: str = SHIFT_TOPIC) -> list[str]:
    """`n` questions: a share `shift_share` about `shift_topic`, the rest spread evenly over `topics`."""
    if not 0.0 <= shift_share <= 1.0:
        raise LmforgeError(f"shift_share must be between 0 and 1, got {shift_share}")
    unknown = [t for t in [*topics, shift_topic] if t not in TOPICS]
    if unknown or not topics:
        raise LmforgeError(f"unknown topic {(unknown or ['(none)'])[0]!r} (known: {', '.join(TOPICS)})")
    shifted = round(n * shift_share)
    out = [question(shift_topic, rng) for _ in range(shifted)]
    out += [question(rng.choice(list(topics)), rng) for _ in range(n - shifted)]
    rng.shuffle(out)
    return out
