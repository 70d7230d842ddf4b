"""The incremental schema checker decides exactly as the whole-text re-validation does.

`SchemaPrefix` steps only a candidate's characters from the state after the accepted
text; `SchemaPrefix(schema, rescan=True)` re-reads everything. Both are driven the way
`constrained_choice` drives them (copy, feed a candidate, keep it only if accepted)
over random prefixes and candidates drawn with fixed seeds, and must agree on every
accept/reject and on when the document is complete.
"""

from __future__ import annotations

import random
import time

import pytest

from lmforge.agent.calls import FunctionSpec, call_schema
from lmforge.agent.tool_prompts import TOOLS
from lmforge.infer.json_schema import SchemaPrefix

from test_json_schema import SCHEMA

TOOL_SCHEMA = call_schema([FunctionSpec(t["function"]["name"], t["function"]["description"], t["function"]["parameters"])
                           for t in TOOLS])

ODD = {
    "anyOf": [
        {"type": "object", "properties": {"k": {"enum": [1, 12, 1.5, -3, True, None, [1, 2], {"a": "b"}]},
                                          "é\"/": {"type": "string"}, "kb": {"const": "x\ny"}},
         "required": ["k"]},
        {"type": "object", "properties": {"k": {"type": "integer"}, "z": {"type": "array", "maxItems": 0}}},
        {"type": "array", "items": {"$ref": "#/$defs/leaf"}, "minItems": 2, "maxItems": 3},
        {"enum": ["naïve", "na", "q\"uote", 7, False]},
        {"type": ["number", "boolean", "null"]},
    ],
    "$defs": {"leaf": {"anyOf": [{"type": "integer"}, {"type": "string", "enum": ["α", "ab"]}, {"type": "object"}]}},
}

BOUNDED = {
    "type": "object",
    "properties": {"s": {"type": "string", "maxLength": 3}, "t": {"type": "string", "minLength": 2, "maxLength": 4},
                   "e": {"enum": ["a", "abcd", "ab"], "maxLength": 2},
                   "u": {"anyOf": [{"type": "string", "maxLength": 1}, {"type": "string", "minLength": 3}]},
                   "z": {"type": "string", "maxLength": 0}},
}

SCHEMAS = {"fields": SCHEMA, "tools": TOOL_SCHEMA, "odd": ODD, "any": {}, "bounded": BOUNDED}

DOCUMENTS = {
    "fields": ['{"name": "Ann", "age": 31, "mood": "sad", "tags": ["a", "b\\u00e9"], "score": -1.5e3, "ok": true,'
               ' "pet": {"kind": "cat", "legs": 4}, "level": 10}', '{"age":0,"name":"\\"x\\"","score":null}'],
    "tools": ['[{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}]',
              '[{"name":"get_order_status","arguments":{"order_id":"A-1"}},{"name":"search_products","arguments":{}}]'],
    "odd": ['{"k": 12, "é\\"/": "\\u00e9t\\u00E9", "kb": "x\\ny"}', '{"k":{"a":"b"},"z":[]}', '[1, "α", {}]',
            '"na\\u00efve"', '"q\\"uote"', '7', '-0.25e+2 ', 'null', '{"k": [1,2]}', '{"k":true}'],
    "any": ['{"a": [1, {"b": null}], "c": "\\ud83d\\ude00", "d": 1e5}', '[true, false, "x", -0]'],
    "bounded": ['{"s": "é\\u00e9x", "t": "ab", "e": "ab", "u": "\\n", "z": ""}', '{"t":"😀😀αb","u":"abcd","s":""}',
                '{"s": "\\ud83d\\ude00", "u": "xyz"}', '{"e": "abcd"}'],
}

PIECES = ['{', '}', '[', ']', '"', ':', ',', ' ', '  ', '\n', '\\', '\\u', '00', 'e9', '\\"', '\\n', '\\/', '1', '12', '-',
          '.', 'e', '+', '0', 'true', 'tru', 'null', 'fa', 'name', 'age', 'city', 'Paris', 'get_', 'weather', 'k', 'é',
          'α', 'naï', 'x', '"k":', '":"', '"}', '}]', ', "', 'arguments', '"name"', '{"', '"a"', '\\ud8', '\\ud83d',
          'abc', 'xy', '"s": "', '"t": "', '"u": "']


def candidates(rng: random.Random, documents: list[str]) -> list[bytes]:
    """Byte strings like a vocabulary's tokens: pieces of real documents, JSON punctuation, split characters."""
    out = []
    for _ in range(12):
        roll = rng.random()
        if roll < 0.45:
            data = rng.choice(documents).encode()
            start = rng.randrange(len(data))
            out.append(data[start:start + rng.randint(1, 6)])
        elif roll < 0.85:
            out.append(rng.choice(PIECES).encode())
        else:
            char = rng.choice(["é", "α", "😀", "\x01", "\t"]).encode()
            out.append(char[: rng.randint(1, len(char))])
    return out


def walk(schema, documents, seed: int, steps: int = 40) -> int:
    """Drive both checkers side by side like constrained_choice; return how many decisions were compared."""
    rng = random.Random(seed)
    fast, slow = SchemaPrefix(schema), SchemaPrefix(schema, rescan=True)
    compared = 0
    for _ in range(steps):
        if fast.done:
            break
        options = candidates(rng, documents)
        # now and then the true continuation of a document, so walks get deep into the grammar
        target = rng.choice(documents).encode()
        if target.startswith(fast.data) and len(target) > len(fast.data):
            options.append(target[len(fast.data): len(fast.data) + rng.randint(1, 5)])
        accepted = None
        for data in options:
            a, b = fast.copy(), slow.copy()
            got, want = a.feed(data), b.feed(data)
            assert got == want, (fast.data, data, got, want)
            compared += 1
            if got:
                assert a.done == b.done, (fast.data, data)
                assert a.text == b.text
                if accepted is None or rng.random() < 0.3:
                    accepted = (a, b)
        if accepted is None:
            break
        fast, slow = accepted
    return compared


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_incremental_checker_decides_as_the_full_rescan(name):
    compared = sum(walk(SCHEMAS[name], DOCUMENTS[name], seed) for seed in range(200))
    assert compared > 5000


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_every_prefix_of_a_valid_document_agrees(name):
    # Byte-wise and in random chunks: the valid path itself, including half characters and escapes.
    rng, decided = random.Random(7), []
    for text in DOCUMENTS[name]:
        data = text.encode()
        for split in ([1] * len(data), [rng.randint(1, 4) for _ in range(len(data))]):
            fast, slow, i = SchemaPrefix(SCHEMAS[name]), SchemaPrefix(SCHEMAS[name], rescan=True), 0
            for size in split:
                if i >= len(data):
                    break
                piece = data[i:i + size]
                i += size
                got = fast.feed(piece)
                assert got == slow.feed(piece), (data[:i], piece)
                assert fast.done == slow.done
                if not got:
                    break  # a rejected feed leaves the reference's state undefined
            decided.append(got and fast.done)
    assert any(decided)


def test_known_decisions_of_the_incremental_checker():
    assert SchemaPrefix(SCHEMA).feed(b'{"na')
    assert not SchemaPrefix(SCHEMA).feed(b'{"nx')
    assert not SchemaPrefix(SCHEMA).feed(b'{"\\u006')  # a key is spelled plainly, not escaped
    assert SchemaPrefix(SCHEMA).feed(b'{"\\u006e')  # (a whole escape in one token is read as its character)
    state = SchemaPrefix(ODD)
    assert state.feed(b'{"k": 1') and not state.done  # 1 may still become 12 or 1.5
    assert state.copy().feed(b'.5}') and not state.copy().feed(b'.3}')  # 1.5 is a member; no integer has a '.'
    assert not SchemaPrefix(TOOL_SCHEMA).feed('[{"'.encode() + b"\xd3")


def test_a_candidate_costs_its_own_length_not_the_texts():
    # After a long accepted string, checking one more token must not re-read the text.
    state = SchemaPrefix({"type": "object", "properties": {"s": {"type": "string"}}})
    assert state.feed(b'{"s": "' + b"ab" * 20000)
    start = time.perf_counter()
    for _ in range(200):
        assert state.copy().feed(b"cd")
    per_candidate = (time.perf_counter() - start) / 200
    assert per_candidate < 1e-3, per_candidate


def test_string_length_bounds():
    def fed(schema, data):
        state = SchemaPrefix(schema)
        return state.feed(data.encode()), state
    short = {"type": "string", "maxLength": 3}
    assert fed(short, '"abc"')[1].done
    assert not fed(short, '"abcd')[0]  # full: only the closing quote may follow
    assert not fed(short, '"abc\\')[0]  # nor an escape, which would be a fourth character
    assert fed(short, '"\\u00e9\\n\\"')[0]  # escapes count as the one character they decode to
    assert fed(short, '"😀😀😀"')[1].done  # characters, not bytes or UTF-16 units
    ok, state = fed(short, '"😀😀😀')
    assert ok and not state.copy().feed("é".encode()[:1])  # half a character cannot fit either
    assert not fed(short, '"\\ud8')[0]  # a surrogate escape is refused in a bounded string
    assert fed({"type": "string"}, '"\\ud83d\\ude00"')[1].done  # and still read where no bound is set
    long = {"type": "string", "minLength": 2}
    assert not fed(long, '"a"')[0] and fed(long, '"ab"')[1].done
    assert not fed({"enum": ["abc", "x"], "maxLength": 2}, '"ab')[0]  # members longer than the bound are out
    for data in ('"abcd', '"abc\\', '"\\ud8', '"ab"', '"a"'):
        for schema in (short, long):
            assert SchemaPrefix(schema).feed(data.encode()) == SchemaPrefix(schema, rescan=True).feed(data.encode())


def test_bad_length_bounds_are_refused_up_front():
    from lmforge.errors import LmforgeError
    from lmforge.infer.json_schema import check_schema
    for bad, words in (({"type": "string", "maxLength": -1}, "non-negative"), ({"maxLength": "3"}, "non-negative"),
                       ({"type": "string", "minLength": 4, "maxLength": 3}, "larger than")):
        with pytest.raises(LmforgeError, match=words):
            check_schema(bad)


def test_the_validator_reads_length_bounds_as_the_decoder_does():
    from lmforge.agent.validate import schema_errors
    schema = {"type": "string", "minLength": 2, "maxLength": 3}
    assert schema_errors("ab", schema) == [] and schema_errors("😀😀😀", schema) == []
    assert schema_errors("a", schema) == ["$: needs at least 2 characters"]
    assert schema_errors("abcd", schema) == ["$: allows at most 3 characters"]
