"""Structured output (I1) under a JSON Schema: decoding that can only produce matching JSON.

`SchemaPrefix` plays the same role as `JsonPrefix` in structured.py (the sampler asks it
whether a candidate token keeps the output valid, see `constrained_choice`), but it
accepts only text that can still become a document valid under a schema: the declared
property names and no others, the right value type for each, enum members, integer
syntax where an integer is asked for, every required property before the object closes.

The check is incremental: the state after the accepted text is a set of pushdown
configurations (persistent tuples, so copying a state costs nothing), and a candidate
token is checked by stepping only its own characters from there, O(len(candidate))
instead of O(len(text)). `anyOf` makes the automaton nondeterministic: each alternative
is a configuration of its own, and the text is valid while any configuration lives.
The earlier checker, a recursive descent that re-reads the whole text per candidate
(`_Checker`), stays as the reference (`SchemaPrefix(schema, rescan=True)`): tests compare
the two decision by decision, and benchmarks/structured_decode.py times them.

The supported schema subset is what structured-output APIs support in strict mode:
`type` (object, array, string, number, integer, boolean, null, or a list of them),
`properties`, `required`, `additionalProperties: false` (implied: undeclared keys are
never generated), `items`, `minItems`, `maxItems`, `minLength`, `maxLength`, `enum`,
`const`, `anyOf`, `$ref` to `#/$defs/...` or `#/definitions/...`, and annotations
(`title`, `description`, ...). Anything else is refused up front by `check_schema`, so
no constraint is silently ignored.

String lengths count characters (code points) of the decoded string, as JSON Schema
does. A bounded string is the way to keep a model from writing one argument until its
token budget runs out: at `maxLength` only the closing quote may follow. In a bounded
string a surrogate escape (`\\ud83d...`) is refused as soon as its second hex digit
shows it (the model writes the character itself instead), so an escape never counts as
a different number of characters than it decodes to.
"""

from __future__ import annotations

import codecs
import json
import re
from typing import Any

from ..errors import LmforgeError

_ANNOTATIONS = {"title", "description", "default", "examples", "$schema", "$id", "$comment", "strict"}
_KEYWORDS = {"type", "properties", "required", "additionalProperties", "items", "minItems", "maxItems",
             "minLength", "maxLength", "enum", "const", "anyOf", "$ref", "$defs", "definitions"} | _ANNOTATIONS
_TYPES = {"object", "array", "string", "number", "integer", "boolean", "null"}
_MAX_WS_RUN = 4  # a model must not pad forever with whitespace
_MAX_NUMBER_CHARS = 24  # nor write digits forever (float64 needs at most 17 significant digits)
_NUMBER = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?")
_INTEGER = re.compile(r"-?(?:0|[1-9]\d*)")

PARTIAL, INVALID = "partial", "invalid"  # besides an int: the position where a complete value ends


def check_schema(schema: Any, root: Any = None, path: str = "schema") -> None:
    """Raise LmforgeError naming the first unsupported or malformed part of `schema`."""
    root = schema if root is None else root
    if schema is True or schema == {}:
        return
    if not isinstance(schema, dict):
        raise LmforgeError(f"{path}: a schema must be an object")
    unknown = sorted(set(schema) - _KEYWORDS)
    if unknown:
        raise LmforgeError(f"{path}: unsupported JSON Schema keyword(s) {', '.join(unknown)}")
    if "$ref" in schema:
        _resolve(schema["$ref"], root, path)
    types = schema.get("type")
    for t in types if isinstance(types, list) else [types] if types is not None else []:
        if not isinstance(t, str) or t not in _TYPES:
            raise LmforgeError(f"{path}: unknown type {t!r}")
    if "enum" in schema and (not isinstance(schema["enum"], list) or not schema["enum"]):
        raise LmforgeError(f"{path}: enum must be a non-empty list")
    extra = schema.get("additionalProperties", False)
    if extra not in (False, True) and not (isinstance(extra, dict) and not extra):
        raise LmforgeError(f"{path}: additionalProperties may only be true or false")
    props = schema.get("properties", {})
    if not isinstance(props, dict):
        raise LmforgeError(f"{path}.properties must be an object")
    for name, sub in props.items():
        check_schema(sub, root, f"{path}.properties.{name}")
    required = schema.get("required", [])
    if not isinstance(required, list) or any(not isinstance(r, str) or r not in props for r in required):
        raise LmforgeError(f"{path}.required must list declared properties")
    if "items" in schema:
        check_schema(schema["items"], root, f"{path}.items")
    for key in ("minItems", "maxItems", "minLength", "maxLength"):
        if key in schema and (not isinstance(schema[key], int) or isinstance(schema[key], bool) or schema[key] < 0):
            raise LmforgeError(f"{path}.{key} must be a non-negative integer")
    for low, high in (("minItems", "maxItems"), ("minLength", "maxLength")):
        if schema.get(low, 0) > schema.get(high, float("inf")):
            raise LmforgeError(f"{path}: {low} is larger than {high}, so no value can match")
    if not isinstance(schema.get("anyOf", []), list) or schema.get("anyOf") == []:
        raise LmforgeError(f"{path}.anyOf must be a non-empty list of schemas")
    for i, sub in enumerate(schema.get("anyOf", [])):
        check_schema(sub, root, f"{path}.anyOf[{i}]")
    for key in ("$defs", "definitions"):
        defs = schema.get(key, {})
        if not isinstance(defs, dict):
            raise LmforgeError(f"{path}.{key} must be an object")
        for name, sub in defs.items():
            check_schema(sub, root, f"{path}.{key}.{name}")


def _resolve(ref: Any, root: dict, path: str) -> dict:
    parts = ref.split("/") if isinstance(ref, str) else []
    if len(parts) != 3 or parts[0] != "#" or parts[1] not in ("$defs", "definitions"):
        raise LmforgeError(f"{path}: only $ref to '#/$defs/NAME' or '#/definitions/NAME' is supported, got {ref!r}")
    try:
        return root[parts[1]][parts[2]]
    except (KeyError, TypeError):
        raise LmforgeError(f"{path}: $ref {ref!r} points nowhere") from None


class SchemaPrefix:
    """Is the text fed so far a prefix of a JSON document valid under `schema`?

    `rescan=True` selects the reference checker, which re-reads the whole text for every
    feed; it accepts exactly the same texts and is kept for tests and benchmarks.
    """

    def __init__(self, schema: dict[str, Any], rescan: bool = False) -> None:
        check_schema(schema)
        self.schema = schema
        self.rescan = rescan
        self.data = b""
        self.text = ""
        self.done = False
        self.pending = b""  # bytes of a character not yet complete
        # Start: the document frame before its value, no blank seen yet.
        self.configs: tuple = ((("doc", "start", 0), _Alternatives(schema, schema)),) if not rescan else ()

    def copy(self) -> "SchemaPrefix":
        other = SchemaPrefix.__new__(SchemaPrefix)
        other.__dict__.update(self.__dict__)
        return other

    def feed(self, data: bytes) -> bool:
        """Consume bytes; False when no continuation of them can match the schema."""
        if self.done:
            return False
        if self.rescan:
            return self._feed_rescan(data)
        try:  # most tokens are whole characters: no incremental decoder needed
            chars, pending = (self.pending + data).decode("utf-8"), b""
        except UnicodeDecodeError:
            decoder = codecs.getincrementaldecoder("utf-8")()
            try:
                chars = decoder.decode(self.pending + data, final=False)
            except UnicodeDecodeError:
                return False
            pending = decoder.getstate()[0]
        configs = self.configs
        for c in chars:
            stepped: dict = {}
            for config in configs:
                for new in _step(config, c):
                    stepped[new] = None
            if not stepped:
                return False
            configs = tuple(stepped)
        verdicts = [_at_cut(config, pending) for config in configs]
        if not any(verdicts):
            return False
        self.configs, self.pending = configs, pending
        self.data += data
        self.text += chars
        self.done = any(v == "done" for v in verdicts)
        return True

    def _feed_rescan(self, data: bytes) -> bool:
        self.data += data
        decoder = codecs.getincrementaldecoder("utf-8")()
        try:
            self.text = decoder.decode(self.data, final=False)
        except UnicodeDecodeError:
            return False
        pending = decoder.getstate()[0]  # bytes of a character not yet complete
        checker = _Checker(self.text, self.schema)
        status = checker.document()
        if status == INVALID:
            return False
        if pending:
            # Half a character can only continue inside a string, and inside a string with
            # fixed candidates (a key, an enum member) only if one of them goes on with it.
            if status != PARTIAL or checker.cut is None:
                return False
            if checker.cut and not any(tail and tail[0].encode()[: len(pending)] == pending for tail in checker.cut):
                return False
        self.done = status != PARTIAL
        return True


# ---------------------------------------------------------------- the incremental checker
#
# A configuration is a stack of frames as a linked list of tuples, (frame, below), with
# the document frame at the bottom; hashable, so equal configurations reached through
# different anyOf alternatives merge. Frames:
#   ("doc", phase, blanks)                       phase "start" (value next) or "end"
#   ("obj", node, seen, phase, blanks, key)      phase "open" (key or "}"), "key", "colon", "value", "next" ("," or "}")
#   ("arr", node, count, phase, blanks)          phase "open" (value or "]"), "value", "next" ("," or "]")
#   ("str", is_key, options, decoded, escape, count, bounds)
#                                                options: the strings it may still become, None for any;
#                                                bounds: (minLength, maxLength or None) of a free string,
#                                                None when unbounded; count: characters so far (bounded only)
#   ("num", integer, token)
#   ("word", word, matched)                      true / false / null
#   ("lit", texts, consumed)                     non-string enum/const members as compact JSON text
# The bottom frame holds the root's alternatives in place of a node.

_BLANK = frozenset(" \t\n\r")
_NUMBER_CHARS = frozenset("0123456789.eE+-")
_HEX = frozenset("0123456789abcdefABCDEF")
_ESCAPED = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_WORDS = (("true", "boolean"), ("false", "boolean"), ("null", "null"))


class _Node:
    """One alternative of a value's schema: `$ref` resolved, `anyOf` expanded, children compiled on demand."""

    def __init__(self, schema: dict[str, Any], root: dict[str, Any]) -> None:
        self.root = root
        options = [schema["const"]] if "const" in schema else schema["enum"] if "enum" in schema else None
        self.literal = options is not None
        if options is not None:
            self.strings = tuple(o for o in options if isinstance(o, str))
            self.texts = tuple(json.dumps(o, separators=(",", ":"), ensure_ascii=False)
                               for o in options if not isinstance(o, str))
        types = schema.get("type")
        self.allowed = frozenset(types if isinstance(types, list) else [types]) if types else frozenset(_TYPES)
        self.integer = "number" not in self.allowed
        self.props = schema.get("properties", {})
        self.required = frozenset(schema.get("required", []))
        self.free = not self.props and schema.get("additionalProperties", True) is not False
        self.items_schema = schema.get("items", True)
        self.low, self.high = schema.get("minItems", 0), schema.get("maxItems")
        short, long = schema.get("minLength", 0), schema.get("maxLength")
        self.bounds = (short, long) if short or long is not None else None
        if options is not None and self.bounds:  # an enum member must also fit the length bounds
            self.strings = tuple(o for o in self.strings if _fits(len(o), self.bounds))
        self._children: dict[Any, tuple] = {}

    def prop(self, key: str) -> tuple:
        if key not in self._children:
            self._children[key] = _Alternatives(self.props.get(key, True), self.root)
        return self._children[key]

    def items(self) -> tuple:
        if None not in self._children:
            self._children[None] = _Alternatives(self.items_schema, self.root)
        return self._children[None]


class _Alternatives(tuple):
    """The `_Node`s a value may match (more than one under `anyOf`), hashed by identity."""

    def __new__(cls, schema: Any, root: dict[str, Any]):
        return super().__new__(cls, _expand(schema, root))

    __hash__ = object.__hash__

    def __eq__(self, other: object) -> bool:
        return self is other


def _expand(schema: Any, root: dict[str, Any]) -> list[_Node]:
    if schema is True:
        schema = {}
    while "$ref" in schema:
        schema = _resolve(schema["$ref"], root, "schema")
    if "anyOf" not in schema:
        return [_Node(schema, root)]
    rest = {k: v for k, v in schema.items() if k != "anyOf"}
    return [node for alt in schema["anyOf"] for node in _expand({**rest, **alt}, root)]


def _complete(below: tuple) -> tuple:
    """The stack once the value on top of `below` is complete."""
    frame, rest = below
    if frame[0] == "doc":
        return (("doc", "end", 0), rest)
    if frame[0] == "obj":
        return (("obj", frame[1], frame[2], "next", 0, frame[5]), rest)
    return (("arr", frame[1], frame[2] + 1, "next", 0), rest)


def _start(alternatives: tuple, c: str, below: tuple) -> list[tuple]:
    """Configurations after the first character `c` of a value matching any of `alternatives`."""
    out = []
    for node in alternatives:
        if node.literal:
            if c == '"':
                if node.strings:
                    out.append(((("str", False, node.strings, "", "", 0, None), below)))
                continue
            texts = tuple(t for t in node.texts if t.startswith(c))
            if any(t == c and not _NUMBER.fullmatch(t) for t in texts):
                out.append(_complete(below))
            elif texts:
                out.append((("lit", texts, c), below))
            continue
        allowed = node.allowed
        if c == "{" and "object" in allowed:
            out.append((("obj", node, frozenset(), "open", 0, None), below))
        elif c == "[" and "array" in allowed:
            out.append((("arr", node, 0, "open", 0), below))
        elif c == '"' and "string" in allowed:
            out.append((("str", False, None, "", "", 0, node.bounds), below))
        elif c in "-0123456789" and ("number" in allowed or "integer" in allowed):
            if _number_prefix_ok(c, node.integer):
                out.append((("num", node.integer, c), below))
        else:
            for word, kind in _WORDS:
                if kind in allowed and c == word[0]:
                    out.append((("word", word, 1), below))
    return out


def _step(config: tuple, c: str) -> list[tuple]:
    """The configurations `config` becomes after character `c` (none: `c` cannot follow)."""
    frame, below = config
    tag = frame[0]
    if tag == "str":
        _, is_key, options, decoded, escape, count, bounds = frame
        if escape:
            if escape == "\\":
                if c == "u":
                    return [(("str", is_key, options, decoded, "\\u", count, bounds), below)]
                if c not in _ESCAPED:
                    return []
                char = _ESCAPED[c]
            else:
                if c not in _HEX or (bounds and _surrogate(escape[2:] + c)):
                    return []
                if len(escape) < 5:
                    return [(("str", is_key, options, decoded, escape + c, count, bounds), below)]
                char = chr(int(escape[2:] + c, 16))
        elif c == '"':
            if options is not None and decoded not in options:
                return []
            if bounds and count < bounds[0]:
                return []
            if not is_key:
                return [_complete(below)]
            obj, rest = below
            seen = obj[2] if obj[1].free else obj[2] | {decoded}
            return [(("obj", obj[1], seen, "colon", 0, decoded), rest)]
        elif bounds and bounds[1] is not None and count >= bounds[1]:
            return []  # full: only the closing quote may follow
        elif c == "\\":
            return [(("str", is_key, options, decoded, "\\", count, bounds), below)]
        elif ord(c) < 0x20:
            return []
        else:
            char = c
        if options is None:
            if bounds:
                return [(("str", is_key, None, "", "", count + 1, bounds), below)]
            return [(("str", is_key, None, "", "", 0, None), below)] if escape else [config]
        decoded += char
        options = tuple(o for o in options if o.startswith(decoded))
        return [(("str", is_key, options, decoded, "", 0, None), below)] if options else []
    if tag == "num":
        _, integer, token = frame
        if c in _NUMBER_CHARS:
            token += c
            if len(token) > _MAX_NUMBER_CHARS or not _number_prefix_ok(token, integer):
                return []
            return [(("num", integer, token), below)]
        if not (_INTEGER if integer else _NUMBER).fullmatch(token):
            return []
        return _step(_complete(below), c)
    if tag == "word":
        _, word, matched = frame
        if word[matched] != c:
            return []
        return [_complete(below)] if matched + 1 == len(word) else [(("word", word, matched + 1), below)]
    if tag == "lit":
        _, texts, consumed = frame
        if c not in _NUMBER_CHARS and any(t == consumed for t in texts):
            return _step(_complete(below), c)  # a number member ended right before `c`
        consumed += c
        texts = tuple(t for t in texts if t.startswith(consumed))
        if any(t == consumed and not _NUMBER.fullmatch(t) for t in texts):
            return [_complete(below)]
        return [(("lit", texts, consumed), below)] if texts else []
    if tag == "obj":
        _, node, seen, phase, blanks, key = frame
        if c in _BLANK:
            return [(("obj", node, seen, phase, blanks + 1, key), below)] if blanks < _MAX_WS_RUN else []
        if phase == "value":
            return _start(node.prop(key), c, (("obj", node, seen, "value", 0, key), below))
        if phase == "colon":
            return [(("obj", node, seen, "value", 0, key), below)] if c == ":" else []
        if c == "}" and phase in ("open", "next"):
            return [_complete(below)] if node.required <= seen else []
        if c == "," and phase == "next":
            if not node.free and all(p in seen for p in node.props):
                return []  # every declared property is there: only "}" may follow
            return [(("obj", node, seen, "key", 0, None), below)]
        if c == '"' and phase in ("open", "key"):
            options = None if node.free else tuple(p for p in node.props if p not in seen)
            if options == ():
                return []
            return [(("str", True, options, "", "", 0, None), (("obj", node, seen, phase, 0, None), below))]
        return []
    if tag == "arr":
        _, node, count, phase, blanks = frame
        if c in _BLANK:
            return [(("arr", node, count, phase, blanks + 1), below)] if blanks < _MAX_WS_RUN else []
        if c == "]" and phase in ("open", "next"):
            return [_complete(below)] if count >= node.low else []
        if phase == "next":
            if c != "," or (node.high is not None and count >= node.high):
                return []
            return [(("arr", node, count, "value", 0), below)]
        if node.high is not None and count >= node.high:
            return []
        return _start(node.items(), c, (("arr", node, count, phase, 0), below))
    # the document
    _, phase, blanks = frame
    if phase == "end":
        return []
    if c in _BLANK:
        return [(("doc", phase, blanks + 1), below)] if blanks < _MAX_WS_RUN else []
    return _start(below, c, (("doc", "start", 0), below))


def _at_cut(config: tuple, pending: bytes) -> str | bool:
    """May the text stop here (with `pending` bytes of a character still to come)? "done" when complete."""
    frame = config[0]
    if frame[0] == "doc" and frame[1] == "end":
        return "done" if not pending else False
    if frame[0] != "str":
        return not pending
    _, _, options, decoded, escape, count, bounds = frame
    if options is None:
        # Any string may go on with any character, unless it is full and a character is half written.
        return not (pending and bounds and bounds[1] is not None and count >= bounds[1])
    tails = [o[len(decoded):] for o in options]
    if escape:
        # Only characters that need an escape (a quote, a backslash, a control character)
        # may come from one, so a fixed string is spelled plainly, not as \\u00XX escapes.
        digits = escape[2:].lower()
        tails = [t for t in tails if t and (t[0] in '"\\' or ord(t[0]) < 0x20) and f"{ord(t[0]):04x}".startswith(digits)]
    if not tails:
        return False
    return not pending or any(t and t[0].encode()[: len(pending)] == pending for t in tails)


class _Checker:
    """Recursive descent over a (possibly cut-off) JSON text against a schema."""

    def __init__(self, text: str, root: dict[str, Any]) -> None:
        self.s, self.root = text, root
        # Where a cut-off text ends inside a string: [] for any string, else the possible
        # remainders of the fixed candidates (keys, enum members); None elsewhere.
        self.cut: list[str] | None = None

    def document(self) -> str | int:
        i = self._ws(0)
        if i is None:
            return INVALID
        if i == len(self.s):
            return PARTIAL
        end = self.value(i, self.root)
        if end in (PARTIAL, INVALID):
            return end
        return end if self.s[end:] == "" else INVALID  # nothing may follow the document

    def _ws(self, i: int) -> int | None:
        start = i
        while i < len(self.s) and self.s[i] in " \t\n\r":
            i += 1
        return i if i - start <= _MAX_WS_RUN else None

    def _next(self, i: int) -> int | str:
        """Position of the next non-blank character, or INVALID (too much blank) / PARTIAL (text ends)."""
        j = self._ws(i)
        if j is None:
            return INVALID
        return PARTIAL if j == len(self.s) else j

    def _schema(self, schema: Any) -> dict[str, Any]:
        if schema is True:
            return {}
        while "$ref" in schema:
            schema = _resolve(schema["$ref"], self.root, "schema")
        return schema

    def value(self, i: int, schema: Any) -> str | int:
        schema = self._schema(schema)
        if "anyOf" in schema:
            results, cuts = [], []
            for alt in schema["anyOf"]:
                self.cut = None
                results.append(self.value(i, {**{k: v for k, v in schema.items() if k != "anyOf"}, **alt}))
                if results[-1] == PARTIAL and self.cut is not None:
                    cuts.append(self.cut)
            ends = [r for r in results if isinstance(r, int)]
            if ends:
                return ends[0]
            # Where the text is cut inside a string, it may go on as any alternative still open
            # there allows (an alternative that failed must not leave its own reading behind).
            self.cut = None if not cuts else [] if any(c == [] for c in cuts) else [t for c in cuts for t in c]
            return PARTIAL if PARTIAL in results else INVALID
        bounds = (schema.get("minLength", 0), schema.get("maxLength"))
        if "const" in schema:
            return self._literal_choice(i, [schema["const"]], bounds)
        if "enum" in schema:
            return self._literal_choice(i, schema["enum"], bounds)
        types = schema.get("type")
        allowed = set(types if isinstance(types, list) else [types]) if types else set(_TYPES)
        c = self.s[i]
        if c == "{" and "object" in allowed:
            return self._object(i, schema)
        if c == "[" and "array" in allowed:
            return self._array(i, schema)
        if c == '"' and "string" in allowed:
            end, decoded = self._string(i)
            if "minLength" not in schema and "maxLength" not in schema:
                if end == PARTIAL:
                    self.cut = []
                return end
            if end == INVALID or any(0xD800 <= ord(ch) <= 0xDFFF for ch in decoded):
                return INVALID
            if end != PARTIAL:
                return end if _fits(len(decoded), bounds) else INVALID
            full = bounds[1] is not None and len(decoded) >= bounds[1]
            if (bounds[1] is not None and len(decoded) > bounds[1]) or (full and self.escape):
                return INVALID
            if _surrogate(self.escape[2:]):
                return INVALID
            self.cut = [""] if full else []  # full: only the closing quote, no further character
            return end
        if (c == "-" or c.isdigit()) and allowed & {"number", "integer"}:
            return self._number(i, integer="number" not in allowed)
        for word, kind in (("true", "boolean"), ("false", "boolean"), ("null", "null")):
            if kind in allowed and word.startswith(self.s[i : i + len(word)]) and c == word[0]:
                return PARTIAL if len(self.s) - i < len(word) else i + len(word)
        return INVALID

    def _literal_choice(self, i: int, options: list[Any], bounds: tuple[int, int | None]) -> str | int:
        """One of fixed values: strings by their decoded text, others as compact JSON text."""
        if self.s[i] == '"':
            end, decoded = self._string(i)
            strings = [o for o in options if isinstance(o, str) and _fits(len(o), bounds)]
            if end == INVALID:
                return INVALID
            if end == PARTIAL:
                self.cut = self._tails(decoded, strings)
                return PARTIAL if self.cut else INVALID
            return end if decoded in strings else INVALID
        rest = self.s[i:]
        texts = [json.dumps(o, separators=(",", ":"), ensure_ascii=False) for o in options if not isinstance(o, str)]
        cut_off = False
        for text in texts:
            if not rest.startswith(text):
                cut_off = cut_off or text.startswith(rest)
                continue
            after = i + len(text)
            if _NUMBER.fullmatch(text):
                if after == len(self.s):
                    cut_off = True  # "1" may still become "12": undecided
                    continue
                if self.s[after] in "0123456789.eE+-":
                    continue  # "12" is not the option "1"
            return after
        return PARTIAL if cut_off else INVALID

    def _tails(self, decoded: str, options: list[str]) -> list[str]:
        """What is left of each option that the cut-off string (and its cut-off escape) can still become."""
        tails = [o[len(decoded):] for o in options if o.startswith(decoded)]
        if self.escape:
            # The next character comes from an escape. Only characters that need one (a
            # quote, a backslash, a control character) may be escaped, so a known key is
            # spelled plainly instead of as a run of \u00XX escapes.
            digits = self.escape[2:].lower()
            tails = [t for t in tails if t and (t[0] in '"\\' or ord(t[0]) < 0x20)
                     and f"{ord(t[0]):04x}".startswith(digits)]
        return tails

    def _string(self, i: int) -> tuple[str | int, str]:
        """(end position, decoded text) of the string at `i`; PARTIAL if it is cut off."""
        out, j = [], i + 1
        self.escape = ""  # an escape cut off at the end of the text
        while j < len(self.s):
            c = self.s[j]
            if c == '"':
                return j + 1, "".join(out)
            if c == "\\":
                if j + 1 >= len(self.s):
                    self.escape = "\\"
                    return PARTIAL, "".join(out)
                e = self.s[j + 1]
                if e == "u":
                    digits = self.s[j + 2 : j + 6]
                    if not re.fullmatch(r"[0-9a-fA-F]*", digits):
                        return INVALID, ""
                    if len(digits) < 4:
                        self.escape = "\\u" + digits
                        return PARTIAL, "".join(out)
                    out.append(chr(int(digits, 16)))
                    j += 6
                    continue
                if e not in '"\\/bfnrt':
                    return INVALID, ""
                out.append(json.loads(f'"\\{e}"'))
                j += 2
                continue
            if ord(c) < 0x20:
                return INVALID, ""
            out.append(c)
            j += 1
        return PARTIAL, "".join(out)

    def _number(self, i: int, integer: bool) -> str | int:
        pattern = _INTEGER if integer else _NUMBER
        j = i
        while j < len(self.s) and self.s[j] in "0123456789.eE+-":
            j += 1
        token = self.s[i:j]
        if len(token) > _MAX_NUMBER_CHARS:
            return INVALID
        if j == len(self.s):  # cut off: could it still grow into a number?
            return PARTIAL if _number_prefix_ok(token, integer) else INVALID
        return j if pattern.fullmatch(token) else INVALID

    def _object(self, i: int, schema: dict[str, Any]) -> str | int:
        props = schema.get("properties", {})
        required = set(schema.get("required", []))
        free = not props and schema.get("additionalProperties", True) is not False
        seen: set[str] = set()
        j = self._next(i + 1)
        if isinstance(j, str):
            return j
        if self.s[j] == "}":
            return j + 1 if required <= seen else INVALID
        while True:
            if self.s[j] != '"':
                return INVALID
            end, key = self._string(j)
            if end == INVALID:
                return INVALID
            candidates = [p for p in props if p not in seen]
            if end == PARTIAL:
                self.cut = [] if free else self._tails(key, candidates)
                return PARTIAL if free or self.cut else INVALID
            if not free and key not in candidates:
                return INVALID
            seen.add(key)
            j = self._next(end)
            if isinstance(j, str):
                return j
            if self.s[j] != ":":
                return INVALID
            j = self._next(j + 1)
            if isinstance(j, str):
                return j
            end = self.value(j, props.get(key, True))
            if end in (PARTIAL, INVALID):
                return end
            j = self._next(end)
            if isinstance(j, str):
                return j
            if self.s[j] == "}":
                return j + 1 if required <= seen else INVALID
            if self.s[j] != ",":
                return INVALID
            if not free and not [p for p in props if p not in seen]:
                return INVALID  # every declared property is there: only "}" may follow
            j = self._next(j + 1)
            if isinstance(j, str):
                return j

    def _array(self, i: int, schema: dict[str, Any]) -> str | int:
        items = schema.get("items", True)
        low, high = schema.get("minItems", 0), schema.get("maxItems")
        count = 0
        j = self._next(i + 1)
        if isinstance(j, str):
            return j
        if self.s[j] == "]":
            return j + 1 if count >= low else INVALID
        while True:
            if high is not None and count >= high:
                return INVALID
            end = self.value(j, items)
            if end in (PARTIAL, INVALID):
                return end
            count += 1
            j = self._next(end)
            if isinstance(j, str):
                return j
            if self.s[j] == "]":
                return j + 1 if count >= low else INVALID
            if self.s[j] != ",":
                return INVALID
            if high is not None and count >= high:
                return INVALID  # the array is full: only "]" may follow
            j = self._next(j + 1)
            if isinstance(j, str):
                return j


def _fits(length: int, bounds: tuple[int, int | None] | None) -> bool:
    return not bounds or (length >= bounds[0] and (bounds[1] is None or length <= bounds[1]))


def _surrogate(digits: str) -> bool:
    """Do the hex digits of a \\u escape (two or more of them) already name a UTF-16 surrogate?"""
    return len(digits) >= 2 and digits[0] in "dD" and digits[1] in "89abcdefABCDEF"


def _number_prefix_ok(token: str, integer: bool) -> bool:
    if integer:
        return bool(re.fullmatch(r"-?(?:0|[1-9]\d*)?", token))
    return bool(re.fullmatch(r"-?(?:(?:0|[1-9]\d*)(?:\.\d*)?(?:[eE][+-]?\d*)?)?", token)) and not re.search(r"\.[eE]", token)
