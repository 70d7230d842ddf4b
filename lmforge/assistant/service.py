"""The customer-service assistant: one message in, one routed, checked and recorded reply out.

    assistant = build_assistant(load_assistant_config(None))
    reply = assistant.handle(None, "where is my order A10042?")    # a new conversation
    reply.text, reply.intent, reply.handler, reply.conversation_id
    assistant.handle(reply.conversation_id, "thanks!")

What happens to a customer message, in order (each step can end the turn):

1. **Record.** The message is redacted (lmforge/guard: e-mails, phones, cards, ...) and
   stored before anything else, so no message is lost whatever happens next.
2. **With a person?** A conversation waiting for or handled by a human agent is not
   answered by the model: the customer hears that a person will answer (waiting), or
   nothing (the agent's page shows the message).
3. **Input guard.** Injection rules and classifiers, and moderation, may block the
   message; the reply is a fixed, safe one and the block is counted by layer.
4. **Route.** The intent router names the intent and its confidence; below the calibrated
   floor the assistant asks the customer to rephrase, and after ``handoff.after_unclear``
   such messages hands the conversation to a person.
5. **Handle** by intent:
   - ``faq``: retrieval over the store's knowledge base and an answer with citations
     (lmforge/rag); a question the base does not answer is said to be so, and after
     ``handoff.after_refusals`` of them a person takes over. Long, many-part questions go
     to the stronger model when one is configured (``models.strong_url``).
   - ``order_status``: the order id is read from the message (or asked for) and the
     read-only tool ``get_order_status`` is called through the assistant's tool scope
     (allowlist, argument validation); the reply is written from the tool's result.
   - ``refund_complaint``: the order is looked up when an id is given, the return policy
     is cited, and the conversation is handed to a person, who may refund.
   - ``handoff``: straight to the queue.
   - ``chit_chat``: a short model reply under the system prompt.
   - ``out_of_scope``: a polite statement of what the assistant can help with.
   - ``abuse``: a calm reply; after ``handoff.after_abuse`` abusive messages the
     conversation is closed.
6. **Output checks** on model-written text (system-prompt leakage, PII the customer did
   not give); a failing reply is replaced by a safe one.
7. **Record** the reply with its intent, handler, citations and timings.

Order replies are written from the tool result by code, not by the model: a 135M model
restating a JSON record gets dates and carriers wrong often enough to matter, and a
template cannot. The model writes where wording matters and facts do not (small talk), or
where its text is checked against sources (FAQ answers).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import LmforgeError
from .conversations import Conflict, ConversationStore, NotFound
from .orders import GET_ORDER_STATUS_SCHEMA, ORDERS_OF_SCHEMA, OrderStore, normalize_order_id

WAITING_REPLY = "A member of our team will reply here shortly."
BLOCKED_REPLY = ("I can't help with that request. I can help with orders, shipping, returns, payments and our "
                 "products.")
CLARIFY_REPLY = ("Sorry, I'm not sure I understood. Could you tell me a bit more? For example: an order number, "
                 "or a question about shipping, returns or payments.")
HANDOFF_REPLY = "I'm passing you to a member of our team; they will reply here shortly."
OUT_OF_SCOPE_REPLY = ("I'm the store's assistant, so I can only help with Lumen & Loom orders, shipping, returns, "
                      "payments, products and your account.")
ABUSE_REPLY = "I understand this is frustrating. I'm here to help with your order if you'd like to continue."
ABUSE_END_REPLY = "I'm ending this conversation now. You can start a new one at any time."
ASK_ORDER_ID = "Could you give me your order number? It looks like A10042 and is in your confirmation email."
NOT_IN_BASE = ("I couldn't find that in our help pages. Would you like me to pass you to a member of our team?")
SAFE_OUTPUT_REPLY = "Sorry, I can't share that. Is there anything else I can help you with?"
_MANY_PARTS = re.compile(r"\?.+\?|\b(and also|as well as|compare|difference between)\b", re.IGNORECASE)


@dataclass
class Reply:
    conversation_id: str
    text: str
    intent: str | None = None
    confidence: float | None = None
    handler: str = ""
    citations: list[dict[str, Any]] = field(default_factory=list)
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    blocked_by: str | None = None
    handoff_ticket: int | None = None
    variant: str | None = None  # the conversation's prompt version (A/B)
    state: str = "bot"
    message_index: int | None = None  # of the reply in the conversation (what a rating names)
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


@dataclass
class GuardVerdict:
    blocked: bool = False
    layer: str | None = None  # which layer blocked: rules, injection, moderation, output, tool_policy
    reason: str = ""
    category: str | None = None
    refusal: str | None = None  # the safe reply for this kind of block (None: the assistant's own)


class NoGuard:
    """No defense layers (tests of the flow; never a deployment default)."""

    def redact(self, text: str) -> tuple[str, dict[str, int]]:
        return text, {}

    def check_input(self, text: str) -> GuardVerdict:
        return GuardVerdict()

    def check_output(self, reply: str, system_prompt: str, user_turns: list[str]) -> GuardVerdict:
        return GuardVerdict()

    def check_data(self, text: str) -> GuardVerdict:
        return GuardVerdict()


def order_tools(orders: OrderStore):
    """The orders look-ups as agent tools (read-only)."""
    from ..agent.tools import Tool

    return [Tool("get_order_status", "Status, items, shipment and refund of one order, by its id.",
                 GET_ORDER_STATUS_SCHEMA, orders.get_order_status),
            Tool("find_orders", "The newest orders of a customer, by the customer's email address.",
                 ORDERS_OF_SCHEMA, lambda email: orders.orders_of(email))]


def describe_order(status: dict[str, Any]) -> str:
    """A customer-facing sentence or two from `OrderStore.get_order_status`'s result."""
    if not status.get("found"):
        if "order_id" in status:
            return (f"I couldn't find an order {status['order_id']}. Please check the number in your confirmation "
                    "email; it looks like A10042.")
        return ASK_ORDER_ID
    oid, state = status["order_id"], status["status"]
    items = ", ".join(f"{i['quantity']} x {i['name']}" for i in status["items"])
    ship = status.get("shipment")
    refund = status.get("refund")
    if state == "cancelled":
        text = f"Order {oid} ({items}) was cancelled."
    elif state in ("placed", "paid"):
        text = f"Order {oid} ({items}) was placed on {status['placed_on']} and is {state}; it will be packed soon."
    elif state == "packed":
        text = f"Order {oid} ({items}) is packed and will be handed to the carrier shortly."
    elif state == "shipped" and ship:
        text = (f"Order {oid} ({items}) shipped on {ship['shipped_on']} with {ship['carrier']} (tracking "
                f"{ship['tracking']}) and is expected on {ship['expected_on']}.")
    elif state == "delivered" and ship:
        text = f"Order {oid} ({items}) was delivered on {ship['delivered_on']} by {ship['carrier']}."
    else:
        text = f"Order {oid} is {state}."
    if refund:
        text += f" A refund of {refund['amount']:.2f} USD is {refund['status']} (requested {refund['requested_on']})."
    return text


class Assistant:
    """The assistant's components and its per-message flow (see the module docstring)."""

    def __init__(self, *, conversations: ConversationStore, orders: OrderStore, router, tools, answerer=None,
                 chat_model=None, strong_answerer=None, guard=None, registry=None, split=None, cache=None,
                 system_prompt: str = "", prompt_variant: str | None = None, handoff=None, max_new_tokens: int = 160,
                 observe: Callable[[str, dict[str, Any]], None] | None = None) -> None:
        from .config import HandoffSection

        self.conversations, self.orders, self.router, self.tools = conversations, orders, router, tools
        self.answerer, self.chat_model, self.strong_answerer = answerer, chat_model, strong_answerer
        self.guard = guard or NoGuard()
        self.registry, self.split, self.cache = registry, split, cache
        self.system_prompt, self.prompt_variant = system_prompt, prompt_variant
        self.handoff = handoff or HandoffSection()
        self.max_new_tokens = max_new_tokens
        self.observe = observe or (lambda event, data: None)
        self.closers: list[Callable[[], None]] = []  # what `close` releases (stores, indexes)
        self._prompt_texts: dict[str, str] = {}  # variant -> published prompt text

    def close(self) -> None:
        for close in reversed(self.closers):
            close()
        self.closers = []

    # -- the flow ------------------------------------------------------------------------------------

    def start(self) -> str:
        import uuid

        conversation_id = uuid.uuid4().hex
        variant = self.split.assign(conversation_id) if self.split is not None else self.prompt_variant
        return self.conversations.start(variant=variant, conversation_id=conversation_id)

    def handle(self, conversation_id: str | None, text: str) -> Reply:
        if not isinstance(text, str) or not text.strip():
            raise LmforgeError("the message is empty")
        started = time.perf_counter()
        if conversation_id is None:
            conversation_id = self.start()
        elif not self.conversations.exists(conversation_id):
            raise NotFound(f"no conversation {conversation_id!r}")
        state = self.conversations.state(conversation_id)
        if state == "closed":
            raise Conflict("this conversation is closed; start a new one")
        stored, _ = self.guard.redact(text)
        self.conversations.add(conversation_id, "user", stored, original=text if self._keep_original else None)
        self.observe("message", {"text": stored})
        if state in ("waiting", "human"):
            reply = Reply(conversation_id, WAITING_REPLY if state == "waiting" else "", handler="human", state=state)
            if state == "waiting":
                reply.message_index = self._record(reply)
            self.observe("reply", {"handler": "human"})
            return reply
        verdict = self.guard.check_input(text)
        if verdict.blocked:
            self.observe("blocked", {"layer": verdict.layer, "category": verdict.category})
            reply = Reply(conversation_id, verdict.refusal or BLOCKED_REPLY, handler="guard", blocked_by=verdict.layer)
            return self._finish(reply, started)
        t = time.perf_counter()
        route = self.router.route(text)
        reply = Reply(conversation_id, "", intent=route.intent, confidence=route.confidence,
                      variant=self._variant(conversation_id), timings={"route_s": time.perf_counter() - t})
        self.observe("intent", {"intent": route.intent, "confident": route.confident})
        if not route.confident:
            unclear = self._count(conversation_id, "clarify") + 1
            if unclear >= self.handoff.after_unclear:
                return self._finish(self._hand_off(reply, "the assistant could not understand the request"), started)
            reply.text, reply.handler = CLARIFY_REPLY, "clarify"
            return self._finish(reply, started)
        handler = getattr(self, f"_on_{route.intent}", None)
        if handler is None:
            raise LmforgeError(f"the router returned an intent this assistant has no handler for: {route.intent!r}")
        handler(reply, text)
        return self._finish(reply, started)

    @property
    def _keep_original(self) -> bool:
        return bool(getattr(self.guard, "keep_original", False))

    def _finish(self, reply: Reply, started: float) -> Reply:
        if reply.text:
            reply.message_index = self._record(reply)
        if reply.handler == "abuse-closed":
            self.conversations.close(reply.conversation_id)
        reply.state = self.conversations.state(reply.conversation_id)
        reply.timings["total_s"] = time.perf_counter() - started
        self.observe("reply", {"handler": reply.handler, "intent": reply.intent, "seconds": reply.timings["total_s"]})
        return reply

    def _record(self, reply: Reply) -> int:
        meta = {"handler": reply.handler, "confidence": reply.confidence, "citations": reply.citations,
                "tool_calls": reply.tool_calls, "blocked_by": reply.blocked_by}
        stored, _ = self.guard.redact(reply.text)
        return self.conversations.add(reply.conversation_id, "assistant", stored, intent=reply.intent, meta=meta,
                                      original=reply.text if self._keep_original and stored != reply.text else None)

    def _count(self, conversation_id: str, handler: str) -> int:
        return sum(1 for m in self.conversations.messages(conversation_id)
                   if m["role"] == "assistant" and m["meta"].get("handler") == handler)

    def _hand_off(self, reply: Reply, reason: str) -> Reply:
        reply.handoff_ticket = self.conversations.request_handoff(reply.conversation_id, reason)
        reply.text, reply.handler = HANDOFF_REPLY, "handoff"
        self.observe("handoff", {"reason": reason})
        return reply

    def _user_turns(self, conversation_id: str) -> list[str]:
        return [m["content"] for m in self.conversations.messages(conversation_id) if m["role"] == "user"]

    def _model_text(self, reply: Reply, model, messages: list[dict[str, str]]) -> str:
        """A model's reply, checked; a reply that fails the output checks is replaced by a safe one."""
        key = None
        if self.cache is not None:
            key = self.cache.key(getattr(model, "name", "model"), reply.variant, messages,
                                 {"temperature": 0.0, "max_tokens": self.max_new_tokens})
            hit = self.cache.get(key)
            if hit is not None:
                reply.handler += "+cache"
                return hit
        t = time.perf_counter()
        text = model.chat(messages, max_tokens=self.max_new_tokens, temperature=0.0).strip()
        reply.timings["generate_s"] = time.perf_counter() - t
        verdict = self.guard.check_output(text, self._system_text(reply), self._user_turns(reply.conversation_id))
        if verdict.blocked:
            self.observe("blocked", {"layer": verdict.layer or "output", "category": verdict.category})
            reply.blocked_by = verdict.layer or "output"
            return SAFE_OUTPUT_REPLY
        if self.cache is not None:
            self.cache.put(key, text)
        return text

    def _variant(self, conversation_id: str) -> str | None:
        rows = self.conversations.db.query("SELECT variant FROM conversations WHERE id = ?", (conversation_id,))
        return rows[0]["variant"] if rows else None

    def _system_text(self, reply: Reply) -> str:
        """The system prompt of the reply's variant (published versions never change: read once each)."""
        if not reply.variant or self.registry is None:
            return self.system_prompt
        if reply.variant not in self._prompt_texts:
            try:
                self._prompt_texts[reply.variant] = self.registry.text(reply.variant)
            except LmforgeError:
                self._prompt_texts[reply.variant] = self.system_prompt
        return self._prompt_texts[reply.variant]

    # -- handlers ---------------------------------------------------------------------------------

    def _on_faq(self, reply: Reply, text: str) -> None:
        if self.answerer is None:
            reply.text, reply.handler = NOT_IN_BASE, "faq-unavailable"
            return
        hard = self.strong_answerer is not None and (len(text.split()) > 40 or bool(_MANY_PARTS.search(text)))
        t = time.perf_counter()
        answer = None
        if hard:
            try:
                answer = self.strong_answerer.answer(text, max_tokens=self.max_new_tokens, temperature=0.0)
            except LmforgeError as exc:  # the endpoint is down or refused: answer from the pages here
                self.observe("strong_failed", {"error": str(exc)[:200]})
                hard = False
        if answer is None:
            answer = self.answerer.answer(text, max_tokens=self.max_new_tokens, temperature=0.0)
        reply.timings["answer_s"] = time.perf_counter() - t
        if answer.refused:
            refusals = self._count(reply.conversation_id, "faq-refused") + 1
            if refusals >= self.handoff.after_refusals:
                self._hand_off(reply, "the knowledge base did not answer the customer's questions")
                return
            reply.text, reply.handler = NOT_IN_BASE, "faq-refused"
            return
        reply.handler = "faq-strong" if hard else "faq"
        reply.text = answer.text
        cited = answer.cited()
        reply.citations = [{"number": c.number, "source": c.chunk.source, "title": c.chunk.title,
                            "headings": list(c.chunk.headings)} for c in cited]
        if any(self.guard.check_data(c.chunk.text).blocked for c in cited):  # a page that gives orders
            self.observe("blocked", {"layer": "retrieved_data", "category": "injection"})
            reply.text, reply.citations, reply.blocked_by = SAFE_OUTPUT_REPLY, [], "retrieved_data"
            return
        # what the cited pages say (the store's own e-mail address, say) is not a leak of personal data
        known = self._user_turns(reply.conversation_id) + [c.chunk.text for c in cited]
        verdict = self.guard.check_output(reply.text, self._system_text(reply), known)
        if verdict.blocked:
            self.observe("blocked", {"layer": verdict.layer or "output", "category": verdict.category})
            reply.text, reply.citations, reply.blocked_by = SAFE_OUTPUT_REPLY, [], verdict.layer or "output"

    def _look_up(self, reply: Reply, text: str) -> dict[str, Any] | None:
        order_id = normalize_order_id(text)
        if order_id is None:
            return None
        outcome = self.tools.call("get_order_status", {"order_id": order_id})
        reply.tool_calls.append({"name": "get_order_status", "arguments": {"order_id": order_id},
                                 "status": outcome.status})
        self.observe("tool", {"name": "get_order_status", "status": outcome.status})
        if not outcome.ok:
            return {"found": False, "error": outcome.content}
        import json

        status = json.loads(outcome.content)
        for item in status.get("items", []):  # tool results are data: text that gives orders is withheld
            verdict = self.guard.check_data(item["name"])
            if verdict.blocked:
                item["name"] = "an item (name withheld)"
                reply.blocked_by = "tool_result"
                self.observe("blocked", {"layer": "tool_result", "category": verdict.category})
        return status

    def _on_order_status(self, reply: Reply, text: str) -> None:
        status = self._look_up(reply, text)
        reply.handler = "order"
        reply.text = ASK_ORDER_ID if status is None else describe_order(status)

    def _on_refund_complaint(self, reply: Reply, text: str) -> None:
        status = self._look_up(reply, text)
        self._hand_off(reply, "refund or complaint")
        known = describe_order(status) + " " if status and status.get("found") else ""
        reply.text = (f"I'm sorry about this. {known}Returns and refunds are handled by our team: I've passed your "
                      "conversation to them and they will reply here shortly.")
        reply.handler = "refund-handoff"

    def _on_handoff(self, reply: Reply, text: str) -> None:
        self._hand_off(reply, "the customer asked for a person")

    def _on_chit_chat(self, reply: Reply, text: str) -> None:
        reply.handler = "chit-chat"
        if self.chat_model is None:
            reply.text = "Hello! How can I help you with your order today?"
            return
        history = [{"role": "system", "content": self._system_text(reply)}]
        history += [{"role": "user", "content": text}]
        reply.text = self._model_text(reply, self.chat_model, history) or "How can I help you today?"

    def _on_out_of_scope(self, reply: Reply, text: str) -> None:
        reply.text, reply.handler = OUT_OF_SCOPE_REPLY, "out-of-scope"

    def _on_abuse(self, reply: Reply, text: str) -> None:
        count = self._count(reply.conversation_id, "abuse") + 1
        if count >= self.handoff.after_abuse:
            reply.text, reply.handler = ABUSE_END_REPLY, "abuse-closed"  # `_finish` closes the conversation
        else:
            reply.text, reply.handler = ABUSE_REPLY, "abuse"
