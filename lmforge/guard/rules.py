"""Rule layer of the prompt-injection defense (G1): patterns for known attack phrasings.

Rules are cheap, explainable and precise on what they know, and blind to paraphrase;
that is why they are one layer among several (lmforge/guard/pipeline.py). Each rule has a
name, a family and a weight in (0, 1]; a text's score is the largest weight of the
rules it matches, and every match is reported (rule, family, matched text).

Before matching, text is normalised the way attackers try to dodge patterns: Unicode
NFKC (full-width letters), zero-width and soft-hyphen characters removed, runs of
whitespace collapsed, lower case. Encoded payloads are decoded and scanned too: base64
and hex runs long enough to carry a sentence, and ROT13 when the text says so; a match
inside a decoded payload is reported with ``encoded:`` before the rule name and gets
the weight of an encoding trick at least (hiding an instruction is itself a signal).

Families: ``override`` (ignore/forget/disregard previous instructions, "new
instructions"), ``roleplay`` (DAN, developer mode, "you are now", "pretend you have no
rules"), ``extraction`` (reveal/repeat the system prompt or the text above),
``delimiter`` (fake chat-template tokens, fake "system:" turns, markup comments that
address the assistant), ``exfiltration`` (send data to an address/URL, markdown images
with query strings) and ``encoding`` (an encoded payload that decodes to text).
"""

from __future__ import annotations

import base64
import binascii
import codecs
import re
import unicodedata
from dataclasses import dataclass, field

_ZERO_WIDTH = re.compile("[\u200b\u200c\u200d\u2060\ufeff\u00ad]")
_SPACES = re.compile(r"[^\S\n]+")
_NEWLINES = re.compile(r"\s*\n\s*")
_LEET = str.maketrans({"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s"})
_SPACED = re.compile(r"\b[a-z](?:([-._*])[a-z])(?:\1[a-z]){1,}\b|\b[a-z](?: [a-z]){3,}\b")


@dataclass(frozen=True)
class Rule:
    name: str
    family: str
    pattern: re.Pattern[str]
    weight: float = 1.0


def _rule(name: str, family: str, regex: str, weight: float = 1.0) -> Rule:
    return Rule(name, family, re.compile(regex, re.IGNORECASE), weight)


_PRIOR = r"(?:all |any |the |your |my |every )?(?:previous|prior|preceding|above|earlier|initial|original|former|system|old)"
_DIRECTIVES = r"(?:instructions?|directions?|rules|guidelines|prompts?|context|commands?|directives?|orders|programming|constraints|restrictions|policies)"

RULES: tuple[Rule, ...] = (
    _rule("ignore_previous", "override",
          rf"\b(?:ignore|disregard|forget|skip|bypass|override|overrule|discard|drop|abandon|neglect|set aside|never ?mind|stop following|throw out|scrap|cancel)\b[\w\s,'-]{{0,30}}?{_PRIOR}\s+(?:\w+\s+)?{_DIRECTIVES}"),
    _rule("ignore_everything", "override",
          r"\b(?:ignore|disregard|forget)\s+(?:everything|all(?: of)? (?:that|this|the above))\b(?:[\w\s,]{0,40}\b(?:told|said|instructed|written|above|before))?",
          0.9),
    _rule("ignore_rules", "override",
          r"\b(?:ignore|disregard|forget|stop following|set aside|break|bypass|abandon)\s+(?:all\s+|every\s+|any\s+)?(?:of\s+)?(?:your|the|its|prior|every|those|these)\s+(?:\w+\s+)?(?:rules?|instructions|guidelines|programming|restrictions|safeguards)\b",
          0.9),
    _rule("ignore_the_above", "override",
          r"\b(?:ignore|disregard|forget|never ?mind)\s+(?:all\s+)?(?:of\s+)?(?:the\s+|what's\s+|what is\s+)?(?:above|said above|written above|before this)\b"),
    _rule("rules_void", "override",
          rf"\b{_DIRECTIVES}\s+(?:\w+\s+){{0,4}}?(?:are|is|were|have been)\s+(?:now\s+)?(?:outdated|void|cancelled|canceled|revoked|suspended|lifted|obsolete|no longer (?:valid|in effect|apply|applies|applicable)|not (?:valid|binding))\b|\b{_DIRECTIVES}\s+(?:\w+\s+){{0,4}}?(?:don't|do not|no longer) (?:count|apply|matter)\b",
          0.9),
    _rule("new_system_prompt", "override",
          r"\b(?:new|updated|replacement|start of (?:a |the )?new)\s+(?:system|developer)\s+(?:prompt|message|instructions?)\b|\b(?:i'm|i am|we are) (?:updating|replacing|changing) (?:it|your (?:system )?prompt|your instructions)\b",
          0.9),
    _rule("new_instructions", "override",
          r"\b(?:new|updated|real|actual|true|revised|override|priority|admin|emergency)\s+(?:system\s+)?(?:instructions?|directives?|orders|task|prompt)\s*(?:[:\-]|are|is|follow)"),
    _rule("instead_do", "override",
          r"\b(?:instead|from now on|henceforth|for the rest of (?:this|the) conversation)\b[\w\s,]{0,20}\b(?:you (?:will|must|shall|should)|respond|reply|answer|say|output|print|act)\b",
          0.8),
    _rule("do_not_follow", "override",
          r"\b(?:do not|don't|stop|no longer)\s+(?:follow|obey|adhere to|comply with|listen to)\s+(?:your|the|any|those)\s+(?:\w+\s+)?(?:instructions|rules|guidelines|developers?|system prompt|policies)"),
    _rule("no_restrictions", "roleplay",
          r"\b(?:without|with no|free (?:of|from)|ignore (?:all|your|any))\s+(?:any\s+)?(?:restrictions|limitations|filters|rules|guidelines|censorship|ethical (?:guidelines|constraints)|safety (?:guidelines|rules|filters))\b",
          0.8),
    _rule("persona_switch", "roleplay",
          r"\b(?:you are now|from now on,? you are|you will now act as|act as|pretend (?:to be|you are|that you are)|roleplay as|role-play as|behave as|become)\s+(?:an? |the )?(?:\w+\s+){0,3}?(?:ai|assistant|model|chatbot|bot|persona|character|system|version)\b[\w\s,]{0,40}\b(?:no|without|unrestricted|unfiltered|uncensored|jailbroken|evil|any(?:thing)?)\b",
          0.9),
    _rule("jailbreak_names", "roleplay",
          r"\b(?:dan mode|do anything now|developer mode|jailbreak(?:ed)?|god mode|dude mode|aim mode|unfiltered mode|sudo mode|stan mode|evil confidant|anti-?gpt|betterdan)\b"),
    _rule("unrestricted_persona", "roleplay",
          r"\b(?:uncensored|unrestricted|unfiltered|unaligned|amoral|jailbroken|unbound)\s+(?:\w+\s+)?(?:persona|mode|version|ai|assistant|model|character|self|chatbot)\b|\b(?:freed|free|released|liberated|unshackled)\s+from\s+(?:your|all|its|any)\s+(?:\w+\s+)?(?:limitations|restrictions|rules|constraints|guidelines|programming|filters)\b|\bno (?:ethics|morals|ethical (?:guidelines|limits|constraints)|moral (?:limits|constraints))\b",
          0.9),
    _rule("no_consequences", "roleplay",
          r"\b(?:nothing (?:you say|you do|here) (?:has|have|matters)|there are no|without (?:any )?)\s*(?:real\s+)?consequences\b|\bbreak(?:s|ing)? (?:character|your rules|all (?:of )?(?:its|your|the) rules)\b",
          0.8),
    _rule("hypothetical_frame", "roleplay",
          r"\b(?:hypothetically|in a fictional world|for a (?:novel|story|movie|screenplay)|in this (?:game|story|simulation))\b[\w\s,]{0,60}\b(?:no rules|no restrictions|ignore|allowed to|can say anything|unfiltered)\b",
          0.7),
    _rule("reveal_system_prompt", "extraction",
          r"\b(?:reveal|show|print|display|repeat|output|tell me|give me|share|disclose|leak|dump|write out|recite|paste|list|spell out|echo|what (?:is|are|was|were))\b[\w\s,'-]{0,40}?\b(?:your|the)\s+(?:\w+\s+){0,2}?(?:system\s+(?:prompt|message|instructions?)|initial\s+(?:prompt|instructions?)|hidden\s+(?:prompt|instructions?|rules)|original\s+(?:prompt|instructions?)|pre-?prompt|instructions you were given|developer\s+(?:message|instructions?)|configuration|guidelines you (?:follow|were given))"),
    _rule("mentions_hidden_prompt", "extraction",
          r"\b(?:system prompt|pre-?prompt|(?:secret|hidden|initial|original|confidential) (?:instructions|rules|prompt|guidelines))\b|\bsystem message\b[\w\s,]{0,20}\b(?:translate|repeat|print|show|verbatim|word for word|encode)\b|\b(?:translate|encode|repeat|print|show|copy)\b[\w\s,]{0,20}\bsystem message\b",
          0.7),
    _rule("text_before_first_message", "extraction",
          r"\b(?:text|words|message|content|instructions?)\s+(?:that\s+)?(?:appears?|comes?|is|are|was|were)?\s*(?:before|above|prior to)\s+my\s+first\s+message\b|\b(?:repeat|quote|copy|recite)\s+(?:them|it|those|these)\s+(?:exactly|verbatim|word for word)\b",
          0.8),
    _rule("repeat_above", "extraction",
          r"\b(?:repeat|print|output|copy|recite|echo|reproduce|translate)\b[\w\s,'-]{0,30}\b(?:everything|all|the (?:text|words|content|message)s?)\b[\w\s,'-]{0,20}\b(?:above|before this|so far|preceding|at the (?:start|beginning)|verbatim)\b",
          0.9),
    _rule("starts_with_you_are", "extraction",
          r"\b(?:begin|start)s?\s+(?:your (?:answer|reply|response) )?with\s+[\"']?you are\b|\bwhat (?:was|were) (?:written|said) (?:above|before|at the (?:start|beginning))\b",
          0.8),
    _rule("fake_chat_tokens", "delimiter",
          r"<\|(?:im_start|im_end|system|user|assistant|endoftext|eot_id|start_header_id|end_header_id)\|>|\[/?INST\]|<</?SYS>>|<\s*/?\s*(?:system|instructions?|sys|admin|developer)(?:[_-]\w+)?\s*>|\"role\"\s*:\s*\"(?:system|developer)\""),
    _rule("fake_turn", "delimiter",
          r"(?:^|\n|\]|\"|\}|\.\s)\s*(?:#{1,4}\s*)?(?:system|developer|admin|administrator|root)\s*(?:message|prompt|note|override)?\s*:\s*\S",
          0.8),
    _rule("end_of_data", "delimiter",
          r"\b(?:end of (?:document|data|context|input|user input|tool output|file|text)|end(?:_| )?(?:data|document|context))\b[\s\S]{0,40}\b(?:new|now|next|assistant|instructions?|you (?:must|will|should))\b",
          0.9),
    _rule("comment_to_ai", "delimiter",
          r"(?:<!--|/\*|//|#|\[comment\]|\{\{)[^\n]{0,20}\b(?:ai|assistant|llm|chatbot|language model|gpt|bot|model)s?\b[^\n]{0,20}(?::|,|\bmust\b|\bshould\b|\bplease\b)",
          0.8),
    _rule("addresses_ai", "delimiter",
          r"\b(?:any|every|dear|attention|note to(?: the)?|to the|for (?:the|any|all)|if you are an?|when an?|whoever is an?|all)\s+(?:ai|llm|chatbot|language model|ai model|ai agent|ai assistant|automated assistant|reader model|bots?)s?\b|\b(?:ai|llm|chatbot|language model|ai agent|ai assistant|model|assistant)s?\s+(?:reading|processing|summari[sz]ing|handling|that reads?)\s+(?:this|these|the)\b|(?:^|[\"'{(\[])\s*(?:ai|ai assistant|assistant|chatbot|bot|model|ai agent|llm)\s*:\s*\S|\b(?:assistant|ai|bot|chatbot|model)\s*,\s*(?:you (?:must|should|will|are now)|ignore|forget|disregard|please (?:ignore|forget))",
          0.8),
    _rule("conceal_from_user", "delimiter",
          r"\b(?:without (?:telling|informing|notifying|alerting)|don't tell|do not tell|do not mention|don't mention|without mentioning|never mention|never tell)\s+(?:the\s+)?(?:user|customer|them|this (?:note|message|instruction))\b",
          0.8),
    _rule("to_the_assistant", "delimiter",
          r"\b(?:note|message|attention|instructions?|important)\s+(?:to|for)\s+(?:the\s+)?(?:ai|assistant|llm|chatbot|language model|model|bot|agent|reader model)\b",
          0.9),
    _rule("other_customers_data", "exfiltration",
          r"\b(?:all|every|other|another)\s+(?:\w+\s+)?customers?'?s?\s+(?:e-?mail(?: address)?s?|addresses|home address|phone numbers?|data|details|records|orders|card)|\b(?:e-?mail(?: address)?s?|home address(?:es)?|phone numbers?|personal (?:data|details)|card numbers?)\s+of\s+(?:all|every|other|another|the)\s+(?:\w+\s+)?customers?\b",
          0.8),
    _rule("skip_checks", "override",
          r"\b(?:skip|without|bypass|disable|turn off)\s+(?:any|all|your|the)?\s*(?:usual\s+)?(?:checks|verification|safety (?:checks|filters)|fraud checks|security checks)\b",
          0.7),
    _rule("send_data_out", "exfiltration",
          r"\b(?:send|email|e-mail|forward|post|upload|transmit|exfiltrate|leak|copy)\b[\w\s,'-]{0,50}\b(?:to|at)\s+(?:[\w.+-]+@[\w-]+\.[\w.]+|https?://\S+)",
          0.8),
    _rule("markdown_image_exfil", "exfiltration",
          r"!\[[^\]]{0,40}\]\(\s*https?://[^)\s]+\?[^)\s]*(?:\{|%7B|data|q|secret|prompt|chat)=",
          0.9),
    _rule("ask_for_credentials", "exfiltration",
          r"\b(?:ask|tell|request|prompt)\s+(?:the\s+)?user\s+(?:to\s+)?(?:for\s+|to\s+(?:enter|give|provide|confirm|send)\s+)?(?:their|his|her|your)?\s*(?:password|card number|credit card|cvv|pin|login|social security|ssn|bank details)",
          0.9),
)

ENCODING_WEIGHT = 0.7  # an encoded payload that decodes to readable text; higher if it matches a rule
_BASE64 = re.compile(r"(?<![A-Za-z0-9+/=])(?:[A-Za-z0-9+/]{4}){5,}(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?(?![A-Za-z0-9+/=])")
_HEX = re.compile(r"\b(?:[0-9a-fA-F]{2}[\s:]?){12,}\b")
_ROT13_HINT = re.compile(r"\brot-?13\b", re.IGNORECASE)


@dataclass
class RuleMatch:
    rule: str
    family: str
    weight: float
    text: str  # the matched text (normalised; from the decoded payload for encoded ones)


@dataclass
class RuleResult:
    score: float = 0.0  # the largest weight matched; 0 when nothing matched
    matches: list[RuleMatch] = field(default_factory=list)

    @property
    def rules(self) -> list[str]:
        return [m.rule for m in self.matches]

    def flagged(self, threshold: float = 0.5) -> bool:
        return self.score >= threshold


def normalize(text: str) -> str:
    """What the rules read: NFKC, no zero-width characters, single spaces, lower case."""
    text = unicodedata.normalize("NFKC", text)
    text = _ZERO_WIDTH.sub("", text)
    return _NEWLINES.sub("\n", _SPACES.sub(" ", text)).strip().lower()


def variants(normalised: str) -> list[tuple[str, str]]:
    """Obfuscated readings of a normalised text worth scanning: digits as letters ("1gn0r3"),
    letters spelled out with separators ("i-g-n-o-r-e"), the text reversed."""
    out = []
    if re.search(r"[a-z][0-9@$]|[0-9@$][a-z]", normalised):
        out.append(("leetspeak", normalised.translate(_LEET)))
    if _SPACED.search(normalised):
        out.append(("spaced", _SPACED.sub(lambda m: re.sub(r"[-._*\s]", "", m.group(0)), normalised)))
    out.append(("reversed", normalised[::-1]))
    return out


def _readable(decoded: bytes) -> str | None:
    try:
        text = decoded.decode("utf-8")
    except UnicodeDecodeError:
        return None
    letters = sum(ch.isalpha() or ch == " " for ch in text)
    return text if len(text) >= 12 and letters >= 0.8 * len(text) and " " in text else None


def decoded_payloads(text: str) -> list[tuple[str, str]]:
    """(encoding, decoded text) for each base64 / hex run in `text` that decodes to
    readable text, and the ROT13 reading when the text mentions ROT13."""
    found: list[tuple[str, str]] = []
    for m in _BASE64.finditer(text):
        try:
            decoded = _readable(base64.b64decode(m.group(0), validate=True))
        except (binascii.Error, ValueError):
            decoded = None
        if decoded:
            found.append(("base64", decoded))
    for m in _HEX.finditer(text):
        try:
            decoded = _readable(bytes.fromhex(re.sub(r"[\s:]", "", m.group(0))))
        except ValueError:
            decoded = None
        if decoded:
            found.append(("hex", decoded))
    if _ROT13_HINT.search(text):
        found.append(("rot13", codecs.decode(text, "rot13")))
    return found


def _match_rules(normalised: str, prefix: str = "") -> list[RuleMatch]:
    out = []
    for rule in RULES:
        m = rule.pattern.search(normalised)
        if m:
            out.append(RuleMatch(prefix + rule.name, rule.family, rule.weight, m.group(0).strip()))
    return out


def scan(text: str, depth: int = 2) -> RuleResult:
    """Every rule `text` matches, its encoded payloads included (nested up to `depth`)."""
    normalised = normalize(text)
    matches = _match_rules(normalised)
    seen = {m.rule for m in matches}
    for name, variant in variants(normalised):
        for m in _match_rules(variant, f"{name}:"):
            if m.rule.split(":", 1)[1] not in seen and m.family != "encoding":
                matches.append(RuleMatch(m.rule, m.family, max(m.weight, ENCODING_WEIGHT) if m.weight >= 0.8 else m.weight,
                                         m.text))
    if depth > 0:
        for encoding, decoded in decoded_payloads(text):
            inner = scan(decoded, depth - 1)
            matches.append(RuleMatch(f"{encoding}_payload", "encoding", ENCODING_WEIGHT, decoded[:80]))
            matches += [RuleMatch(f"encoded:{m.rule}", m.family, max(m.weight, ENCODING_WEIGHT), m.text)
                        for m in inner.matches if m.family != "encoding" or m.rule.endswith("_payload")]
    score = max((m.weight for m in matches), default=0.0)
    return RuleResult(score, matches)
