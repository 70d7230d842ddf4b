"""Parameter-efficient fine-tuning (F3, F4): adapters on a frozen lmforge Transformer that
load and save in Hugging Face PEFT's format.

    from lmforge.tune.peft import PeftOptions, apply_peft, trainable_parameters, save_adapter
    model = apply_peft(model, PeftOptions(method="lora", r=8, alpha=16, target_modules=["q_proj", "v_proj"]))
    trainable, total = trainable_parameters(model)
    ... train the parameters with requires_grad ...
    save_adapter(model, "out/adapter", base_model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct")
    load_adapter(fresh_base, "out/adapter")     # also reads adapters PEFT wrote
    merge(model); unmerge(model)                 # fold LoRA / (IA)3 into the base weights and back
    base = merge_and_unload(model)               # a plain Transformer, e.g. for save_hf_model

The API:
- `PeftOptions`: the method (none, lora, qlora, ia3, prompt, prefix, bottleneck, bitfit) and
  its settings; every field is also a command-line flag (``--peft``, ``--lora-r`` ...).
- `apply_peft(model, options) -> model`: freezes the base and inserts the adapter; LoRA,
  QLoRA, (IA)3, bottleneck and BitFit change `model` in place and return it; prompt and
  prefix tuning return a `VirtualTokenModel` wrapping it (same forward/hidden_states).
  Method "none" returns the model unchanged (full fine-tuning).
- `trainable_parameters(model) -> (trainable, total)`; `memory_report(model)`: a line with
  both counts and the bytes the weights, gradients and AdamW states take.
- `save_adapter(model, directory, base_model_name_or_path)`: adapter_config.json +
  adapter_model.safetensors, written atomically. LoRA/QLoRA, (IA)3, prompt and prefix
  tuning use PEFT's names, so `peft.PeftModel.from_pretrained` loads them on the Hugging
  Face model of the same base; bottleneck adapters and BitFit have no PEFT equivalent and
  are saved in an lmforge-only format (``peft_type`` LMFORGE_BOTTLENECK / LMFORGE_BITFIT).
- `load_adapter(model, directory) -> model`: applies a saved adapter (lmforge's or PEFT's)
  to a base model and loads its weights; a mismatch (another base, unsupported method or
  option) is an `LmforgeError`.
- `merge(model)` / `unmerge(model)`: LoRA adds scale * B A into the rows of each targeted
  slice of the fused weights, (IA)3 multiplies them; unmerge subtracts/divides again.
  `merge_and_unload(model)` merges and removes the adapter modules.

Hugging Face module names (q_proj, gate_proj, query, c_attn ...) name *slices* of lmforge's
fused projections (targets.py): the model is never un-fused. QLoRA stores every block's
linear weights in NF4 with double-quantized scales (lmforge/infer/nf4.py) and trains LoRA
on top in float32.
"""

from __future__ import annotations

from .options import METHODS, PeftOptions

_API = ("apply_peft", "trainable_parameters", "memory_report", "save_adapter", "load_adapter", "merge", "unmerge",
        "merge_and_unload")
__all__ = ["METHODS", "PeftOptions", *_API]


def __getattr__(name: str):
    # The functions need torch; the options (read when command-line flags are built) do not.
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
