"""lm-evaluation-harness against `lmforge serve`, driven as a user drives it: the per-choice
log-likelihoods of a multiple-choice task equal those of the harness's own transformers
backend on the same weights (the default model, converted to a Hugging Face directory).

The harness scores a choice with /v1/completions, `echo: true, max_tokens: 1, logprobs: 1`,
and drops the last `token_logprobs` entry as the generated token. Whenever the model's next
token is the end token, that entry must still be there, or a real prompt token is dropped.
Everything runs offline: the task is a local JSON-lines file of MMLU questions that
lm_eval itself ships.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from lmforge.eval.bench import load_task

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
QUESTIONS = 60
TOLERANCE = 1e-3  # both sides run float32 forwards; they differ by about 1e-4 at most


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_task(folder: Path) -> str:
    """A local lm_eval task: MMLU questions spread over the subjects, the harness's MMLU prompt."""
    records = load_task("mmlu-cot-281").records  # lm_eval/tasks/mmlu/flan_cot_fewshot/_cot_prompts.json
    step = len(records) // QUESTIONS
    chosen = records[::step][:QUESTIONS]
    data = folder / "mmlu.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in chosen), encoding="utf-8")
    name = "lmforge_mmlu_local"
    config = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(folder / "datasets-cache")},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": "The following are multiple choice questions (with answers) about {{subject_name}}.\n\n"
                       "{{question}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\nD. {{choices[3]}}\nAnswer:",
        "doc_to_choice": ["A", "B", "C", "D"],
        "doc_to_target": "answer",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    }
    (folder / f"{name}.yaml").write_text(json.dumps(config), encoding="utf-8")  # JSON is YAML
    return name


def wait_for(url: str, proc: subprocess.Popen, log: Path, seconds: float = 300) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"lmforge serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.5)
    pytest.fail(f"lmforge serve did not come up:\n{log.read_text()[-3000:]}")


def per_choice(results: dict, task: str) -> dict[int, list[float]]:
    """doc id -> the log-likelihood of each choice, from the harness's logged samples."""
    return {s["doc_id"]: [float(r[0]) for r in s["filtered_resps"]] for s in results["samples"][task]}


def metric(text: str, name: str) -> float:
    return float(re.search(rf"^{name} (\S+)$", text, re.M)[1])


def test_harness_scores_through_the_server_as_through_transformers(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    import lm_eval
    from lm_eval.tasks import TaskManager

    task = write_task(tmp_path)
    port, log = free_port(), tmp_path / "serve.log"
    with open(log, "w") as out:  # a file, not a pipe: one log line per request must never block the server
        server = subprocess.Popen([sys.executable, "-m", "lmforge", "serve", "--port", str(port),
                                   "--db", str(tmp_path / "serve.db")], stdout=out, stderr=subprocess.STDOUT)
    try:
        hf_dir = tmp_path / "hf"  # converted while the server loads the same model
        subprocess.run([sys.executable, "-m", "lmforge", "convert", MODEL, str(hf_dir)], check=True,
                       capture_output=True)
        url = f"http://127.0.0.1:{port}"
        wait_for(url, server, log)
        tasks = TaskManager(include_path=str(tmp_path), include_defaults=False)
        remote = lm_eval.simple_evaluate(
            model="local-completions",
            model_args=f"base_url={url}/v1/completions,tokenizer={hf_dir},tokenizer_backend=huggingface",
            tasks=[task], task_manager=tasks, log_samples=True)
        counts = httpx.get(url + "/metrics").text
    finally:
        server.terminate()
        server.wait(60)
    local = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={hf_dir},dtype=float32,device=cpu",
                                    tasks=[task], task_manager=tasks, log_samples=True)

    served, reference = per_choice(remote, task), per_choice(local, task)
    assert sorted(served) == sorted(reference) == list(range(QUESTIONS))
    differences = [abs(a - b) for doc in reference for a, b in zip(served[doc], reference[doc], strict=True)]
    assert len(differences) == 4 * QUESTIONS
    print(f"{len(differences)} choices of {QUESTIONS} questions: largest difference {max(differences):.2e} nats")
    assert max(differences) < TOLERANCE, sorted(differences)[-5:]
    # The case this guards: one generated token per scored choice, and for some of them the
    # model's next token was the end token (it ends a generation without being counted).
    generations = metric(counts, "lmforge_generation_latency_seconds_count")
    ended_by_end_token = generations - metric(counts, "lmforge_generated_tokens_total")
    assert generations == 4 * QUESTIONS and ended_by_end_token > 0
