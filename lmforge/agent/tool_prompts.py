"""A generated set of tool-use prompts with the call each one expects (S5 measurement).

Five functions of a customer-service assistant whose schemas cover what tool calling
must handle: enums, integers, numbers, booleans, a nested object, optional and required
fields, strings bounded by maxLength (a free string argument is where a small model
rambles until its token budget ends). Every prompt is a user request that one of them answers, with the expected
function name and exact arguments. The set is built from templates and fixed value
lists by a seeded generator, so it is the same on every machine and every run.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

CITIES = ["Paris", "Berlin", "Tokyo", "Madrid", "Rome", "Oslo", "Cairo", "Lima", "Seoul", "Toronto"]
UNITS = ["km", "mile", "kg", "pound", "celsius", "fahrenheit", "liter", "gallon"]
PAIRS = [("km", "mile"), ("mile", "km"), ("kg", "pound"), ("pound", "kg"), ("celsius", "fahrenheit"),
         ("fahrenheit", "celsius"), ("liter", "gallon"), ("gallon", "liter")]
CATEGORIES = ["shoes", "books", "laptops", "phones", "toys"]

TOOLS: list[dict[str, Any]] = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Get the current weather in a city.",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "enum": CITIES},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"]}}},
    {"type": "function", "function": {
        "name": "get_order_status", "description": "Look up the status of a customer's order by its number.",
        "parameters": {"type": "object", "properties": {"order_id": {"type": "integer"}},
                       "required": ["order_id"]}}},
    {"type": "function", "function": {
        "name": "convert_units", "description": "Convert a quantity from one unit to another.",
        "parameters": {"type": "object", "properties": {
            "value": {"type": "number"},
            "from_unit": {"type": "string", "enum": UNITS},
            "to_unit": {"type": "string", "enum": UNITS}},
            "required": ["value", "from_unit", "to_unit"]}}},
    {"type": "function", "function": {
        "name": "calculator", "description": "Evaluate an arithmetic expression.",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string", "maxLength": 64}},
                       "required": ["expression"]}}},
    {"type": "function", "function": {
        "name": "search_products", "description": "Search the shop's catalogue.",
        "parameters": {"type": "object", "properties": {
            "query": {"type": "string", "maxLength": 40},
            "filters": {"type": "object", "properties": {
                "category": {"type": "string", "enum": CATEGORIES},
                "max_price": {"type": "integer"},
                "in_stock": {"type": "boolean"}},
                "required": ["category", "max_price", "in_stock"]}},
            "required": ["query", "filters"]}}},
]


@dataclass
class ToolPrompt:
    prompt: str
    name: str  # the function that should be called
    arguments: dict[str, Any]  # with exactly these arguments


def _weather(rng: random.Random) -> ToolPrompt:
    city, unit = rng.choice(CITIES), rng.choice(["celsius", "fahrenheit"])
    text = rng.choice(["What is the weather in {c} right now? Give it in {u}.",
                       "How warm is it in {c}? Use {u}.",
                       "Tell me the current weather for {c} in {u}."]).format(c=city, u=unit)
    return ToolPrompt(text, "get_weather", {"city": city, "unit": unit})


def _order(rng: random.Random) -> ToolPrompt:
    order = rng.randint(1000, 99999)
    text = rng.choice(["Where is my order {o}?", "Can you check the status of order number {o}?",
                       "My order #{o} has not arrived yet. What is its status?"]).format(o=order)
    return ToolPrompt(text, "get_order_status", {"order_id": order})


def _convert(rng: random.Random) -> ToolPrompt:
    a, b = rng.choice(PAIRS)
    value = rng.choice([rng.randint(1, 500), round(rng.uniform(0.5, 100), 1)])
    text = rng.choice(["Convert {v} {a} to {b}.", "How many {b} is {v} {a}?",
                       "Please turn {v} {a} into {b}."]).format(v=value, a=a, b=b)
    return ToolPrompt(text, "convert_units", {"value": value, "from_unit": a, "to_unit": b})


def _calculate(rng: random.Random) -> ToolPrompt:
    x, y, z = rng.randint(2, 999), rng.randint(2, 99), rng.randint(2, 9)
    expression = rng.choice(["{x} * {y}", "{x} + {y} * {z}", "({x} - {y}) / {z}", "{x} ** 2"]).format(x=x, y=y, z=z)
    text = rng.choice(["Calculate {e}.", "What is {e}?", "Use the calculator for {e}."]).format(e=expression)
    return ToolPrompt(text, "calculator", {"expression": expression})


def _search(rng: random.Random) -> ToolPrompt:
    category = rng.choice(CATEGORIES)
    price = rng.choice([20, 50, 100, 250, 500, 1000])
    query = rng.choice({"shoes": ["running shoes", "boots"], "books": ["science fiction", "cookbook"],
                        "laptops": ["gaming laptop", "ultrabook"], "phones": ["android phone", "flip phone"],
                        "toys": ["lego set", "puzzle"]}[category])
    stock = rng.random() < 0.7
    text = rng.choice(["Find {q} in {c} under {p} dollars{s}.", "Search {c} for {q}, at most {p} dollars{s}.",
                       "I want {q} ({c}) for no more than {p} dollars{s}."]).format(
        q=query, c=category, p=price, s=", only items in stock" if stock else ", in stock or not")
    return ToolPrompt(text, "search_products",
                      {"query": query, "filters": {"category": category, "max_price": price, "in_stock": stock}})


MAKERS = [_weather, _order, _convert, _calculate, _search]


def tool_prompts(n: int = 200, seed: int = 0) -> list[ToolPrompt]:
    """`n` prompts, the five functions in turn, values drawn by a generator seeded with `seed`."""
    rng = random.Random(seed)
    return [MAKERS[i % len(MAKERS)](rng) for i in range(n)]
