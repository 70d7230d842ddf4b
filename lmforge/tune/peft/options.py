"""`PeftOptions`: which parameter-efficient method and its settings (every field is a flag)."""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.options import option

METHODS = ("none", "lora", "qlora", "ia3", "prompt", "prefix", "bottleneck", "bitfit")


def _names(value) -> list[str]:
    if isinstance(value, str):
        value = [value]
    return [n.strip() for v in value or [] for n in v.split(",") if n.strip()]


@dataclass
class PeftOptions:
    method: str = option("none", flag="--peft", choices=METHODS,
                         help="parameter-efficient method (none = full fine-tuning)")
    r: int = option(8, flag="--lora-r", help="LoRA rank")
    alpha: float = option(16.0, flag="--lora-alpha", help="LoRA alpha (scale = alpha / r)")
    dropout: float = option(0.0, flag="--lora-dropout", help="dropout on the LoRA input")
    rslora: bool = option(False, flag="--rslora", help="rank-stabilized LoRA: scale = alpha / sqrt(r)")
    target_modules: list[str] = option(default_factory=list, nargs="+", parse=_names,
                                       help="Hugging Face module names to adapt (q_proj v_proj, all-linear; "
                                            "default: PEFT's default for the model family)")
    feedforward_modules: list[str] = option(default_factory=list, nargs="+", parse=_names,
                                            help="(IA)3: targets whose input, not output, is scaled (none: no such module; "
                                                 "default: the family's feed-forward output projection)")
    num_virtual_tokens: int = option(16, help="prompt/prefix tuning: learned virtual tokens")
    bottleneck_size: int = option(64, help="bottleneck adapter width")
    bottleneck_style: str = option("houlsby", choices=("houlsby", "pfeiffer"),
                                   help="houlsby: after attention and feed-forward; pfeiffer: after feed-forward only")
    pack_frozen: bool = option(False, help="LoRA training on CPU: keep oneDNN-packed copies of each adapted frozen "
                                           "weight and its transpose (about 5%% faster steps, two more weight "
                                           "copies in memory)")
    quant_block: int = option(64, help="QLoRA: weights per NF4 absmax block")
    double_quant: bool = option(True, help="QLoRA: quantize the absmax constants to 8 bits (blocks of 256)")
    seed: int | None = option(None, cli=False, help="seed for the adapters' initialization")
