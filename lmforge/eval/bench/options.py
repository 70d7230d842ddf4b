"""The settings of one benchmark run (`BenchOptions`), apart from the runner.

Kept free of the runner's imports (task templates, the sandbox) so that the command
line, which generates `lmforge eval bench`'s flags from these fields, starts fast.
"""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import LmforgeError
from ...options import int_list, option


@dataclass
class BenchOptions:
    """Settings of one run; every field is also a flag of `lmforge eval bench`."""

    limit: int | None = option(None, help="score only the first N items")
    shots: int | None = option(None, help="few-shot exemplars per prompt (default: the task's, 0 for built-ins)")
    cot: bool = option(False, help="chain-of-thought variant (generate reasoning, then the answer)")
    variant: str | None = option(None, help="another named variant of the task (mmlu-cot-281: cloze, cot; "
                                            "humaneval: chat)")
    samples: int = option(1, help="samples per item: majority vote (generation) or n for pass@k (code); "
                                  "1 = greedy")
    temperature: float | None = option(None, help="sampling temperature (default 0 for one sample, else 0.7 for "
                                                  "generation, 0.8 for code)")
    top_p: float = option(0.95, help="nucleus mass when sampling")
    ks: tuple[int, ...] | None = option(None, flag="--k", parse=lambda text: tuple(int_list(text, "--k")),
                                        help="pass@k values, comma-separated (default 1,10,100 up to --samples)")
    max_tokens: int | None = option(None, help="most tokens per generated answer (default: the task's)")
    batch_size: int = option(8, help="prompts generated together")
    batch_tokens: int = option(4096, help="tokens per log-likelihood forward pass")
    seed: int = option(1234, help="base seed for sampled answers")
    workers: int | None = option(None, help="sandbox programs run at once (default: CPU count, at most 8)")
    timeout: float | None = option(None, help="sandbox seconds per program (default: the task's, 10 for humaneval)")
    memory_mb: int = option(1024, help="sandbox memory per program in MiB")
    unsafe_no_sandbox: bool = option(False, help="where the sandbox cannot isolate (no bubblewrap or no namespaces), "
                                                 "run model-written code directly on this machine instead of "
                                                 "refusing; it can then read, change and delete your files")

    def __post_init__(self) -> None:
        if self.limit is not None and self.limit < 1:
            raise LmforgeError("--limit must be at least 1")
        if self.samples < 1:
            raise LmforgeError("--samples must be at least 1")
        if self.shots is not None and self.shots < 0:
            raise LmforgeError("--shots must be >= 0")
        if self.temperature is not None and self.temperature < 0:
            raise LmforgeError("--temperature must be >= 0")
        if self.batch_size < 1 or self.batch_tokens < 1:
            raise LmforgeError("--batch-size and --batch-tokens must be positive")
        if self.ks is not None and any(k < 1 or k > self.samples for k in self.ks):
            raise LmforgeError(f"pass@k needs 1 <= k <= --samples ({self.samples}), got {list(self.ks)}")
        if self.cot and self.variant not in (None, "cot"):
            raise LmforgeError(f"--cot selects the cot variant; it cannot be combined with --variant {self.variant}")
        if self.cot:
            self.variant = "cot"
        self.cot = self.variant == "cot"
