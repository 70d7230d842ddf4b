"""A model behind any OpenAI-compatible endpoint, with the same interface as a local one (S2).

`RemoteModel` offers what `lmforge.api.LoadedModel` offers for text in, text out:
`generate`, `complete`, `chat`, `stream`, `stream_chat`, plus `prompt_logprobs` for
scorers (perplexity, log-likelihood benchmarks) when the endpoint supports
`echo` + `logprobs` on /v1/completions. So `lmforge chat`, evaluation and applications
run unchanged on the local engine, on an `lmforge serve` elsewhere, or on a hosted API.

The trade-off in one line: a hosted API costs per token and sends data off the machine;
self-hosting costs hardware and operations and keeps data in. See the handbook page.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from ..errors import LmforgeError


RETRY_STATUS = (429, 502, 503, 504)  # busy or restarting: worth asking again; other errors are final


@dataclass
class PromptScores:
    """What an endpoint says about one echoed prompt: its tokens as text and their log-probs."""

    tokens: list[str]
    logprobs: list[float | None]  # log p(token i | tokens before it); the first is None (nothing before it)
    top: list[dict[str, float] | None]  # the most likely tokens at each position, when asked for


@dataclass
class RemoteCompletion:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int


class RemoteModel:
    """Text generation through an OpenAI-compatible HTTP API."""

    def __init__(self, base_url: str, api_key: str | None = None, model: str | None = None, timeout: float = 600.0,
                 retries: int = 0) -> None:
        import httpx

        self.retries = max(0, int(retries))  # extra attempts for requests that are safe to repeat (scoring)
        self.base_url = base_url.rstrip("/")
        if not self.base_url.endswith("/v1"):
            self.base_url += "/v1"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)
        self.tokenizer = None  # the remote side tokenizes
        self.model = None
        self.name = model or self._first_model()

    # ------------------------------------------------------------------ HTTP
    def _post(self, path: str, payload: dict[str, Any], retries: int = 0) -> dict[str, Any]:
        """POST and decode; with `retries`, transport failures and busy answers are tried again."""
        import httpx

        for attempt in range(retries + 1):
            last = attempt == retries
            try:
                response = self._http.post(path, json=payload)
            except httpx.HTTPError as exc:
                if last:
                    raise LmforgeError(f"cannot reach {self.base_url}: {_one_line(exc)}") from None
                time.sleep(_backoff(attempt))
                continue
            if response.status_code in RETRY_STATUS and not last:
                time.sleep(_backoff(attempt, response.headers.get("retry-after")))
                continue
            return self._check(response)
        raise AssertionError("unreachable")  # the last attempt returns or raises

    def _check(self, response) -> dict[str, Any]:
        try:
            body = response.json()
        except ValueError:
            body = {}
        if response.status_code >= 400:
            message = (body.get("error") or {}).get("message") if isinstance(body, dict) else None
            raise LmforgeError(f"{self.base_url} answered {response.status_code}: "
                               f"{_one_line(message or response.text[:200])}")
        return body

    def _first_model(self) -> str:
        data = self.list_models()
        if not data:
            raise LmforgeError(f"{self.base_url} lists no models; pass the model name")
        return data[0]["id"]

    def _stream(self, path: str, payload: dict[str, Any]) -> Iterator[dict[str, Any]]:
        import httpx

        try:
            with self._http.stream("POST", path, json={**payload, "stream": True}) as response:
                if response.status_code >= 400:
                    response.read()
                    self._check(response)
                for line in response.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    yield json.loads(data)
        except httpx.HTTPError as exc:
            raise LmforgeError(f"cannot reach {self.base_url}: {exc}") from None

    @staticmethod
    def _sampling(sampling: dict[str, Any]) -> dict[str, Any]:
        """lmforge's SamplingParams names -> OpenAI request fields (the names mostly agree)."""
        out = dict(sampling)
        out.pop("ignore_eos", None)
        # lmforge's extensions are sent only when they do something, so strict endpoints accept the request.
        for key, neutral in (("top_k", 0), ("min_p", 0.0), ("repetition_penalty", 1.0)):
            if out.get(key) == neutral:
                out.pop(key)
        if out.get("stop") is not None and isinstance(out["stop"], str):
            out["stop"] = [out["stop"]]
        return {k: v for k, v in out.items() if v is not None}

    # ---------------------------------------------------------- the interface
    def complete(self, prompts: str | Sequence[str], **sampling: Any) -> list[RemoteCompletion]:
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        body = self._post("/completions", {"model": self.name, "prompt": prompts, **self._sampling(sampling)})
        usage = body.get("usage") or {}
        choices = sorted(body["choices"], key=lambda c: c["index"])
        return [RemoteCompletion(c["text"], c.get("finish_reason") or "stop", usage.get("prompt_tokens", 0),
                                 usage.get("completion_tokens", 0)) for c in choices]

    def generate(self, prompt: str, **sampling: Any) -> str:
        return self.complete(prompt, **sampling)[0].text

    def chat(self, messages: Sequence[dict[str, Any]] | str, **sampling: Any) -> str:
        body = self._post("/chat/completions", {"model": self.name, "messages": _as_messages(messages),
                                                **self._sampling(sampling)})
        return body["choices"][0]["message"]["content"] or ""

    def stream_chat(self, messages: Sequence[dict[str, Any]] | str, **sampling: Any) -> Iterator[str]:
        payload = {"model": self.name, "messages": _as_messages(messages), **self._sampling(sampling)}
        for chunk in self._stream("/chat/completions", payload):
            for choice in chunk.get("choices") or []:
                text = (choice.get("delta") or {}).get("content")
                if text:
                    yield text

    def stream(self, prompt: str, **sampling: Any) -> Iterator[str]:
        payload = {"model": self.name, "prompt": prompt, **self._sampling(sampling)}
        for chunk in self._stream("/completions", payload):
            for choice in chunk.get("choices") or []:
                if choice.get("text"):
                    yield choice["text"]

    def prompt_logprobs(self, prompt: str | list[int]) -> tuple[list[str], list[float | None]]:
        """Tokens of `prompt` and the log-prob of each given those before it (first: None)."""
        body = self._post("/completions", {"model": self.name, "prompt": prompt, "max_tokens": 0,
                                           "echo": True, "logprobs": 0})
        lp = body["choices"][0].get("logprobs")
        if not lp or "token_logprobs" not in lp:
            raise LmforgeError(f"{self.base_url} does not return prompt log-probabilities (echo + logprobs)")
        return lp["tokens"], lp["token_logprobs"]

    def score_prompts(self, prompts: Sequence[Sequence[int]], top: int = 0) -> list[PromptScores]:
        """Log-prob of every token of each token-id prompt given those before it, in one request.

        Uses /v1/completions with a list of token arrays as the prompt, `echo` (return the
        prompt), `logprobs` (with `top` alternatives per position) and `max_tokens=0` (nothing
        is generated). The request is repeated on transport errors and busy answers, up to
        `retries` times: scoring has no side effects, so asking twice is harmless.
        """
        prompts = [[int(t) for t in p] for p in prompts]
        if not prompts or any(not p for p in prompts):
            raise ValueError("score_prompts needs at least one non-empty token list")
        body = self._post("/completions", {"model": self.name, "prompt": prompts, "max_tokens": 0, "echo": True,
                                           "logprobs": int(top)}, retries=self.retries)
        choices = body.get("choices") if isinstance(body, dict) else None
        if not isinstance(choices, list) or len(choices) != len(prompts):
            raise LmforgeError(f"{self.base_url} answered {len(choices) if isinstance(choices, list) else 'no'} "
                               f"choices for {len(prompts)} prompts")
        out = []
        for choice, ids in zip(sorted(choices, key=lambda c: c.get("index", 0)), prompts):
            lp = choice.get("logprobs") or {}
            values = lp.get("token_logprobs")
            if not isinstance(values, list) or not values:
                raise LmforgeError(f"{self.base_url} does not return prompt log-probabilities "
                                   "(it needs echo + logprobs with max_tokens=0 on /v1/completions)")
            # With max_tokens=0 the answer is the prompt alone; some servers still add a token.
            if len(values) < len(ids):
                raise LmforgeError(f"{self.base_url} returned {len(values)} log-probs for a prompt of {len(ids)} tokens "
                                   "(the endpoint may not accept token-id prompts)")
            tokens = list(lp.get("tokens") or [])[: len(ids)]
            tops = list(lp.get("top_logprobs") or [None] * len(ids))[: len(ids)]
            out.append(PromptScores(tokens, [None if v is None else float(v) for v in values[: len(ids)]], tops))
        return out

    def list_models(self) -> list[dict[str, Any]]:
        """The endpoint's /v1/models entries."""
        import httpx

        try:
            return list(self._check(self._http.get("/models")).get("data") or [])
        except httpx.HTTPError as exc:
            raise LmforgeError(f"cannot reach {self.base_url}: {_one_line(exc)}") from None

    def close(self) -> None:
        self._http.close()


def _backoff(attempt: int, retry_after: str | None = None) -> float:
    """Seconds to wait before another attempt: the server's Retry-After if sane, else doubling from 0.5 s."""
    try:
        if retry_after is not None:
            return min(30.0, max(0.0, float(retry_after)))
    except ValueError:
        pass
    return min(8.0, 0.5 * 2**attempt)


def _one_line(message: Any) -> str:
    return " ".join(str(message).split()) or type(message).__name__


def _as_messages(messages: Sequence[dict[str, Any]] | str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": messages}] if isinstance(messages, str) else list(messages)
