"""The `lmforge` command.

Every subcommand is a thin shell over the Python API: parse flags, call the library,
print. Errors the user can cause end as one line on stderr and exit status 1; heavy
modules (torch, the model code) are imported only by the subcommands that need them,
so `lmforge --help` answers at once.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from typing import Any

from .errors import LmforgeError

# Stages that bring their own subcommands: each module has `register(subparsers)` and
# imports nothing heavy at module level (the parser is built on every invocation).
COMMAND_MODULES: tuple[str, ...] = ("lmforge.eval.commands", "lmforge.serve.commands", "lmforge.data.commands",
                                     "lmforge.tokenizer.commands", "lmforge.train.estimate_commands",
                                     "lmforge.train.commands")

MODEL_HELP = "registered model name, Hugging Face directory or .gguf file (default: the default model)"


def _add_sampling(p: argparse.ArgumentParser, temperature: float) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate (default 256)")
    g.add_argument("--temperature", type=float, default=temperature, help=f"0 = greedy (default {temperature})")
    g.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (default 0.9; 1 = off)")
    g.add_argument("--top-k", type=int, default=0, help="keep only the k most likely tokens (0 = off)")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p x the top probability")
    g.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages repeats (1 = off)")
    g.add_argument("--stop", action="append", default=[], help="stop before this string (repeatable)")
    g.add_argument("--seed", type=int, default=None, help="random seed for reproducible sampling")


def _add_runtime(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="cpu, cuda, mps or auto (default)")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16, float16 or auto (fp32 on CPU)")
    p.add_argument("--base-url", help="use an OpenAI-compatible endpoint instead of a local model "
                                      "(MODEL is then the remote model name)")
    p.add_argument("--api-key", default=None, help="API key for --base-url (default: $OPENAI_API_KEY)")


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    return dict(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty, stop=args.stop, seed=args.seed,
    )


def _load(args: argparse.Namespace):
    if args.base_url:
        import os

        from .infer.remote import RemoteModel

        return RemoteModel(args.base_url, args.api_key or os.environ.get("OPENAI_API_KEY"), args.model)
    from .api import load

    started = time.perf_counter()
    if sys.stderr.isatty():
        print(f"loading {args.model or 'the default model'} ...", file=sys.stderr, end="\r", flush=True)
    lm = load(args.model, dtype=args.dtype, device=args.device)
    if sys.stderr.isatty():
        print(f"loaded {lm.name} in {time.perf_counter() - started:.1f}s" + " " * 20, file=sys.stderr)
    return lm


def cmd_generate(args: argparse.Namespace) -> int:
    from .infer import SamplingParams

    params = SamplingParams(**_sampling(args))  # validate flags before the slow load
    lm = _load(args)
    if args.json:
        if lm.model is None:  # remote: the endpoint reports counts, not timings
            done = lm.complete(args.prompt, **_sampling(args))[0]
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
        }, ensure_ascii=False))
        return 0
    for delta in lm.stream(args.prompt, **_sampling(args)):
        print(delta, end="", flush=True)
    print()
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from .infer import SamplingParams

    sampling = _sampling(args)
    SamplingParams(**sampling)
    lm = _load(args)
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


def cmd_convert(args: argparse.Namespace) -> int:
    from .api import load_model, load_tokenizer, pick_dtype
    from .model.checkpoint import save_hf_model
    from .model.registry import resolve

    spec = resolve(args.src)
    dtype = pick_dtype(None if args.dtype == "auto" else args.dtype, __import__("torch").device("cpu"))
    model = load_model(spec, dtype=dtype)
    try:
        tokenizer = load_tokenizer(spec)
    except LmforgeError as exc:
        print(f"note: saving without a tokenizer ({exc})", file=sys.stderr)
        tokenizer = None
    out = save_hf_model(model, args.dst, tokenizer=tokenizer, overwrite=args.overwrite)
    print(f"wrote {out} ({model.num_parameters():,} parameters, {str(dtype).removeprefix('torch.')})")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .model.registry import DEFAULT_MODEL, REGISTRY

    for name, entry in REGISTRY.items():
        try:
            where = str(entry.path())
        except LmforgeError:
            where = f"not installed ({entry.install})"
        default = " (default)" if name == DEFAULT_MODEL else ""
        print(f"{name}{default}\n  {entry.description}\n  {where}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from .model.info import describe

    info = describe(args.model)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return 0
    print(f"model: {info['name']} ({info['format']}, {info['path']})")
    for key, value in info["config"].items():
        if key != "extra":
            print(f"  {key}: {value}")
    print(f"parameters: {info['parameters']:,}")
    print("weights in memory:")
    for dtype, size in info["weight_bytes"].items():
        print(f"  {dtype:>9}: {size / 2**20:8.1f} MiB")
    kv = info["kv_cache_bytes_per_token"]
    print(f"KV cache per token: {kv['float32'] / 1024:.1f} KiB fp32, {kv['bfloat16'] / 1024:.1f} KiB bf16 "
          f"({kv['float32'] * info['config']['max_position_embeddings'] / 2**20:.0f} MiB fp32 for the full context)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmforge", description="A hackable end-to-end LLM toolkit.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("generate", help="complete a prompt")
    p.add_argument("model", nargs="?", help=MODEL_HELP)
    p.add_argument("--prompt", required=True, help="text to complete")
    p.add_argument("--json", action="store_true", help="print one JSON object with text, token counts and timings")
    _add_sampling(p, temperature=0.7)
    _add_runtime(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="chat with a model (streaming)")
    p.add_argument("model", nargs="?", help=MODEL_HELP)
    p.add_argument("--message", help="answer this one message and exit")
    p.add_argument("--system", help="system prompt")
    _add_sampling(p, temperature=0.7)
    _add_runtime(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("convert", help="save a model as a Hugging Face directory")
    p.add_argument("src", help=MODEL_HELP)
    p.add_argument("dst", help="output directory")
    p.add_argument("--dtype", default="float32", help="weights dtype (default float32)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("models", help="list registered models")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("info", help="config, parameter count and memory of a model")
    p.add_argument("model", nargs="?", help=MODEL_HELP)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    for module in COMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except LmforgeError as exc:
        print(f"lmforge: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
