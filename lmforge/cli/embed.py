"""``lmforge embed``: texts -> sentence-embedding vectors (JSONL or .npy).

    lmforge embed notes.txt                       # one text per line -> JSONL on stdout
    cat questions.txt | lmforge embed --out q.npy
    lmforge embed docs.jsonl --jsonl --field body --out docs.jsonl.out --no-normalize

Each output line is ``{"index": i, "embedding": [...]}``, i counting the texts in input
order (every line of a text file is a text, empty ones included; every record of a JSONL
file). Progress goes to stderr, so stdout carries only the vectors.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from lmforge.cli.common import add_config_flags, add_device_flags, config_from_args
from lmforge.errors import LmforgeError
from lmforge.options import option

OUT_SUFFIXES = (".jsonl", ".npy")


@dataclass
class EmbedOptions:
    """What `lmforge embed` reads, how it embeds, and where the vectors go."""

    # The positional FILE arguments (see `register`); none or "-" reads stdin.
    inputs: list[str] = option(default_factory=list, cli=False, help="text or JSONL files to embed")
    model: str = option("all-minilm-l6-v2", help="embedding model: registered name, sentence-transformers or BERT "
                                                 "directory")
    batch_size: int = option(32, help="texts per forward pass")
    normalize: bool = option(True, help="scale vectors to unit length (--no-normalize: keep the pooled vectors as "
                                        "they are)")
    jsonl: bool = option(False, help="inputs are JSONL: one record per line, a string or an object with --field")
    field: str = option("text", help="with --jsonl: the record field that holds the text")
    out: str | None = option(None, metavar="FILE", help="write FILE.jsonl or FILE.npy (atomically) instead of JSONL "
                                                        "on stdout")

    def __post_init__(self) -> None:
        if not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise LmforgeError(f"--batch-size must be a positive integer, not {self.batch_size!r}")
        if self.out is not None and not self.out.endswith(OUT_SUFFIXES):
            raise LmforgeError(f"--out must end in {' or '.join(OUT_SUFFIXES)}, not {self.out!r}")
        if self.out is not None and not Path(self.out).expanduser().parent.is_dir():
            raise LmforgeError(f"cannot write {self.out}: its directory does not exist")
        if self.field != "text" and not self.jsonl:
            raise LmforgeError("--field applies to --jsonl inputs")
        self.inputs = list(self.inputs or [])


def read_texts(options: EmbedOptions, stdin=None) -> list[str]:
    """Every text of every input, in order (stdin for no inputs or "-")."""
    from lmforge.io.text_files import parse_jsonl, read_text, text_of

    texts: list[str] = []
    for name in options.inputs or ["-"]:
        if name == "-":
            stream = stdin if stdin is not None else sys.stdin
            try:
                content = stream.read()
            except UnicodeDecodeError as exc:
                raise LmforgeError(f"stdin is not UTF-8 text: {exc.reason}") from None
            source = "<stdin>"
        else:
            content, source = read_text(name, "input"), name
        lines = content.splitlines()
        if options.jsonl:
            texts += [text_of(record, f"{source}:{number}", options.field)
                      for number, record in parse_jsonl(lines, source)]
        else:
            texts += lines
    return texts


def json_line(index: int, vector) -> str:
    # 9 significant digits give back the same float32 when read.
    return f'{{"index": {index}, "embedding": [{", ".join(f"{x:.9g}" for x in vector.tolist())}]}}\n'


def write_vectors(vectors, path: str | None, stdout=None) -> None:
    import numpy as np

    from lmforge.io.atomic import atomic_path

    if path is None:
        stream = stdout if stdout is not None else sys.stdout
        for i, vector in enumerate(vectors):
            stream.write(json_line(i, vector))
        stream.flush()
        return
    try:
        with atomic_path(Path(path).expanduser(), suffix=".npy" if path.endswith(".npy") else ".tmp") as tmp:
            if path.endswith(".npy"):
                with open(tmp, "wb") as f:
                    np.save(f, np.ascontiguousarray(vectors, dtype=np.float32))
            else:
                with open(tmp, "w", encoding="utf-8") as f:
                    for i, vector in enumerate(vectors):
                        f.write(json_line(i, vector))
    except OSError as exc:
        raise LmforgeError(f"cannot write {path}: {exc.strerror or exc}") from None


def cmd_embed(args: argparse.Namespace) -> int:
    from lmforge.io.progress import Progress
    from lmforge.rag.embedder import load_embedder

    options = config_from_args(EmbedOptions, args, inputs=args.inputs)
    texts = read_texts(options)
    embedder = load_embedder(options.model, device=args.device, dtype=args.dtype)
    progress = Progress(f"embed {embedder.name}", total=len(texts), unit="texts", log_every=5.0)
    vectors = embedder.encode(texts, batch_size=options.batch_size, normalize=options.normalize, progress=progress)
    plural = "" if len(texts) == 1 else "s"
    progress.close(f"embedded {len(texts):,} text{plural} ({embedder.dim}-d, {embedder.model_id})")
    write_vectors(vectors, options.out)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("embed", help="texts -> sentence-embedding vectors (JSONL or .npy)",
                              description="Embed texts with a sentence-embedding model; vectors as JSONL "
                                          "({\"index\": i, \"embedding\": [...]}) or a .npy matrix.")
    p.add_argument("inputs", nargs="*", metavar="FILE",
                   help="text files (one text per line) or, with --jsonl, JSONL files; none or - reads stdin")
    add_config_flags(p, EmbedOptions)
    add_device_flags(p)
    p.set_defaults(func=cmd_embed)
