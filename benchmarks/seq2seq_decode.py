"""Encoder-decoder decoding speed: lmforge's seq2seq loop and beam search vs transformers' generate().

Both decode the same randomly initialised Marian model (by default the shape of the Bible
translator recipe: 3+3 layers, width 192, vocabulary 6000), loaded by lmforge from the
directory transformers saved. EOS is never produced by a random model often enough to matter,
so both run the full `--new-tokens`; outputs are compared token for token. Rounds alternate
between the two and the medians are reported, so a burst of load on a shared machine hits both.

    python benchmarks/seq2seq_decode.py --rounds 3 --threads 1

Prints a table and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--source-len", type=int, default=40)
    parser.add_argument("--new-tokens", type=int, default=40)
    parser.add_argument("--width", type=int, default=192)
    parser.add_argument("--vocab", type=int, default=6000)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import transformers as T

    from lmforge.infer.beam import seq2seq_generate
    from lmforge.model.seq2seq_io import load_seq2seq

    torch.manual_seed(0)
    reference = T.MarianMTModel(T.MarianConfig(
        vocab_size=args.vocab, d_model=args.width, encoder_layers=3, decoder_layers=3, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=4 * args.width, decoder_ffn_dim=4 * args.width,
        max_position_embeddings=256, pad_token_id=1, decoder_start_token_id=1, eos_token_id=2, scale_embedding=True,
        activation_function="swish")).eval()
    with tempfile.TemporaryDirectory() as tmp:
        reference.save_pretrained(tmp)
        model = load_seq2seq(tmp)
    src = torch.randint(3, args.vocab, (args.batch, args.source_len))
    mask = torch.ones_like(src)
    results: dict[str, dict[str, list[float]]] = {}
    agree: dict[str, bool] = {}
    for beams in (1, 4):
        name = "greedy" if beams == 1 else f"beam{beams}"
        times = {"lmforge": [], "transformers": []}
        for _ in range(args.rounds):
            start = time.perf_counter()
            ours = seq2seq_generate(model, src, mask, max_new_tokens=args.new_tokens, num_beams=beams)
            times["lmforge"].append(time.perf_counter() - start)
            start = time.perf_counter()
            with torch.no_grad():
                theirs = reference.generate(input_ids=src, attention_mask=mask, max_new_tokens=args.new_tokens,
                                            num_beams=beams, do_sample=False, forced_eos_token_id=None)
            times["transformers"].append(time.perf_counter() - start)
        agree[name] = ours == [[t for t in row.tolist()[1:] if t not in (1, 2)] for row in theirs]
        results[name] = times
    rows = {}
    print(f"{'decoding':<8} {'lmforge s':>10} {'transformers s':>15} {'speed-up':>9} {'same tokens':>12}")
    for name, times in results.items():
        ours, theirs = statistics.median(times["lmforge"]), statistics.median(times["transformers"])
        rows[name] = {"lmforge_s": ours, "transformers_s": theirs, "speedup": theirs / ours,
                      "target_tokens_per_s": args.batch * args.new_tokens / ours, "same_tokens": agree[name]}
        print(f"{name:<8} {ours:>10.3f} {theirs:>15.3f} {theirs / ours:>8.2f}x {str(agree[name]):>12}")
    print(json.dumps({"benchmark": "seq2seq_decode", "batch": args.batch, "source_len": args.source_len,
                      "new_tokens": args.new_tokens, "threads": args.threads, "rounds": args.rounds,
                      "parameters": model.num_parameters(), **rows}))


if __name__ == "__main__":
    main()
