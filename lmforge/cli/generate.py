"""``lmforge generate`` and ``lmforge chat``: text from a local model or an OpenAI-compatible endpoint."""

from __future__ import annotations

import argparse
import json
import sys

from lmforge.cli.common import (add_config_flags, add_device_flags, add_model_argument, add_remote_flags,
                                add_sampling_flags, config_from_args, load_model, sampling_kwargs)
from lmforge.errors import LmforgeError
from lmforge.serve.config import SpeculativeOptions


def use_speculation(lm, options: SpeculativeOptions):
    """Install the --speculative drafter on a loaded model's generator (the server passes it to its scheduler)."""
    if options.speculative == "none":
        return None
    if lm.model is None:
        raise LmforgeError("--speculative decodes a local model; it cannot drive a --base-url endpoint")
    from lmforge.infer.speculative import make_speculator

    lm.generator.speculator = make_speculator(options.speculative, lm.model, lm.tokenizer, options.num_draft_tokens,
                                              options.draft_model, options.draft_layers)
    return lm.generator.speculator


def beam_generate(lm, prompt: str, num_beams: int, max_tokens: int, length_penalty: float,
                  early_stopping: bool | str) -> dict:
    """The best of `num_beams` beams for one prompt of a local decoder-only model (lmforge/infer/beam.py)."""
    import time

    import torch

    from lmforge.infer.beam import BeamParams, DecoderStepper, beam_search
    from lmforge.infer.request import check_prompt, end_token_ids
    from lmforge.infer.sampling import SamplingParams

    if lm.model is None:
        raise LmforgeError("--num-beams decodes a local model; it cannot drive a --base-url endpoint")
    params = BeamParams(num_beams, max_tokens, length_penalty, early_stopping)
    ids = lm.tokenizer.encode(prompt)
    config = lm.model.config
    budget = check_prompt(ids, SamplingParams(max_tokens=max_tokens), config.max_position_embeddings, config.vocab_size)
    params.max_new_tokens = budget

    start = time.perf_counter()
    stepper = DecoderStepper(lm.model, torch.tensor([ids]), num_beams, budget)
    eos = end_token_ids(config, lm.tokenizer)
    best = beam_search(stepper, 1, params, list(eos))[0]
    tokens = best.tokens[:-1] if best.tokens and best.tokens[-1] in eos else best.tokens
    return {"text": lm.tokenizer.decode(tokens), "tokens": tokens, "score": best.score,
            "finish_reason": "stop" if len(tokens) < len(best.tokens) else "length",
            "prompt_tokens": len(ids), "completion_tokens": len(best.tokens),
            "seconds": time.perf_counter() - start}


def cmd_generate(args: argparse.Namespace) -> int:
    from lmforge.infer.sampling import SamplingParams

    sampling = sampling_kwargs(args)
    params = SamplingParams(**sampling)  # validate flags before the slow load
    speculative = config_from_args(SpeculativeOptions, args)
    if args.num_beams > 1:
        from lmforge.infer.beam import BeamParams

        BeamParams(args.num_beams, args.max_tokens, args.length_penalty, args.early_stopping)  # validate
        if speculative.speculative != "none":
            raise LmforgeError("--num-beams is its own search: drop --speculative")
    elif args.num_beams < 1:
        raise LmforgeError("--num-beams must be at least 1")
    lm = load_model(args)
    if args.num_beams > 1:
        done = beam_generate(lm, args.prompt, args.num_beams, args.max_tokens, args.length_penalty, args.early_stopping)
        if args.json:
            print(json.dumps({"model": lm.name, "text": done["text"], "finish_reason": done["finish_reason"],
                              "prompt_tokens": done["prompt_tokens"], "completion_tokens": done["completion_tokens"],
                              "num_beams": args.num_beams, "score": round(done["score"], 6),
                              "seconds": round(done["seconds"], 4)}, ensure_ascii=False))
        else:
            print(done["text"])
        return 0
    speculator = use_speculation(lm, speculative)
    if args.json:
        if lm.model is None:  # remote: the endpoint reports counts, not timings
            done = lm.complete(args.prompt, **sampling)[0]
            print(json.dumps({"model": lm.name, "text": done.text, "finish_reason": done.finish_reason,
                              "prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens},
                             ensure_ascii=False))
            return 0
        done = lm.generator.generate(args.prompt, params)[0]
        print(json.dumps({
            "model": lm.name,
            "text": done.text,
            "finish_reason": done.finish_reason,
            "prompt_tokens": done.prompt_tokens,
            "completion_tokens": done.completion_tokens,
            "prefill_seconds": round(done.prefill_seconds, 4),
            "decode_seconds": round(done.decode_seconds, 4),
            "decode_tokens_per_second": round((done.completion_tokens - 1) / done.decode_seconds, 2)
            if done.decode_seconds > 0 and done.completion_tokens > 1 else None,
            **({"speculative": speculative.speculative, "draft_acceptance": round(speculator.stats.acceptance_rate, 4),
                "tokens_per_step": round(speculator.stats.tokens_per_step, 3)} if speculator is not None else {}),
        }, ensure_ascii=False))
        return 0
    for delta in lm.stream(args.prompt, **sampling):
        print(delta, end="", flush=True)
    print()
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from lmforge.infer.sampling import SamplingParams

    sampling = sampling_kwargs(args)
    SamplingParams(**sampling)
    speculative = config_from_args(SpeculativeOptions, args)
    lm = load_model(args)
    use_speculation(lm, speculative)
    history: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []

    def answer(text: str) -> None:
        history.append({"role": "user", "content": text})
        reply = []
        for delta in lm.stream_chat(history, **sampling):
            reply.append(delta)
            print(delta, end="", flush=True)
        print()
        history.append({"role": "assistant", "content": "".join(reply)})

    if args.message is not None:
        answer(args.message)
        return 0
    print(f"chatting with {lm.name}; /reset clears the conversation, /exit or Ctrl-D quits", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print(file=sys.stderr)
            return 0
        if line.strip() in ("/exit", "/quit"):
            return 0
        if line.strip() == "/reset":
            del history[int(bool(args.system)):]
            continue
        if line.strip():
            answer(line)


def _early_stopping(text: str) -> bool | str:
    value = {"true": True, "false": False, "never": "never"}.get(text.lower())
    if value is None:
        raise argparse.ArgumentTypeError("expected true, false or never")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="complete a prompt")
    add_model_argument(p)
    p.add_argument("--prompt", required=True, help="text to complete")
    p.add_argument("--json", action="store_true", help="print one JSON object with text, token counts and timings")
    add_sampling_flags(p, temperature=0.7)
    g = p.add_argument_group("beam search")
    g.add_argument("--num-beams", type=int, default=1,
                   help="keep this many hypotheses and print the best (deterministic: the sampling flags "
                        "other than --max-tokens do not apply; 1 = sample)")
    g.add_argument("--length-penalty", type=float, default=1.0,
                   help="beam score = log p / length ** this (default 1.0; > 0 favours longer outputs)")
    g.add_argument("--early-stopping", type=_early_stopping, default=False,
                   help="true: stop when num-beams hypotheses ended; false (default): when none can win; never")
    add_config_flags(p, SpeculativeOptions, "speculative decoding")
    add_device_flags(p)
    add_remote_flags(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="chat with a model (streaming)")
    add_model_argument(p)
    p.add_argument("--message", help="answer this one message and exit")
    p.add_argument("--system", help="system prompt")
    add_sampling_flags(p, temperature=0.7)
    add_config_flags(p, SpeculativeOptions, "speculative decoding")
    add_device_flags(p)
    add_remote_flags(p)
    p.set_defaults(func=cmd_chat)
