"""Benchmark harness: tasks as data, log-likelihood scoring, answer extraction, pass@k, built-in tasks."""

from __future__ import annotations

import itertools
import json
import math
import random

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.eval.bench import (BenchOptions, LoglikelihoodScorer, TaskSpec, build_prompt, evaluate, extract_answer,
                                load_task, majority_vote, make_task, mean_pass_at_k, pass_at_k)
from lmforge.eval.bench.extract import answers_match
from lmforge.eval.bench.task import render
from lmforge.model import ModelConfig, Transformer


# -- pass@k --------------------------------------------------------------------------------------

def brute_force_pass_at_k(n: int, c: int, k: int) -> float:
    """Share of all k-subsets of n samples (c of them passing) that contain a passing one."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(samples[i] for i in s) for s in subsets) / len(subsets)


@pytest.mark.parametrize("n,c,k", [(1, 0, 1), (1, 1, 1), (5, 2, 1), (5, 2, 3), (6, 0, 2), (6, 5, 2), (8, 3, 8), (10, 1, 4)])
def test_pass_at_k_is_the_unbiased_estimator(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(brute_force_pass_at_k(n, c, k), abs=1e-12)
    assert pass_at_k(n, c, k) == pytest.approx(1 - math.comb(n - c, k) / math.comb(n, k), abs=1e-12)


def test_pass_at_1_is_the_pass_rate_and_k_beyond_n_is_refused():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert mean_pass_at_k([(1, 1), (1, 0), (1, 0), (1, 1)], 1) == 0.5
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 5)


# -- answer extraction ----------------------------------------------------------------------------------

@pytest.mark.parametrize("text,how,expected", [
    ("She pays 3 * 4 = 12 dollars.\n#### 12", "number", "12"),
    ("The answer is $1,250.", "number", "1250"),
    ("First 2 apples, then 7 more, so 9", "number", "9"),
    ("no digits here", "number", None),
    ("Cranial cavity holds it. The answer is (B).", "letter", "B"),
    ("Answer: D", "letter", "D"),
    ("the answer is a bird", "letter", None),
    ("(A) is wrong, so (C)", "letter", "C"),
    ("\n  Paris\nis the capital", "first_line", "Paris"),
    ("result=41; result=42", "regex:result=(\\d+)", "42"),
    ("Sure:\n```python\ndef f():\n    return 1\n```\nDone.", "code_block", "def f():\n    return 1\n"),
    ("```\nx = 1\n", "code_block", "x = 1\n"),  # unclosed fence: to the end
    ("return 2", "code_block", "return 2"),  # no fence: the whole reply
])
def test_extract_answer(text, how, expected):
    assert extract_answer(text, how) == expected


def test_answers_match_numbers_by_value_and_text_normalized():
    assert answers_match("12.0", "12", "number")
    assert not answers_match("13", "12", "number")
    assert answers_match("  paris. ", "Paris", "exact")
    assert not answers_match(None, "x", "exact")


def test_majority_vote_counts_equal_answers_together_and_breaks_ties_by_order():
    assert majority_vote(["3", "3.0", "4", None], "number") == ("3", 2)
    assert majority_vote(["B", "A", "A", "B"], "letter") == ("B", 2)
    assert majority_vote([None, None], "exact") == (None, 0)


# -- log-likelihood -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=64, n_layer=2, n_embd=32, n_head=4, intermediate_size=64, max_position_embeddings=48)
    return Transformer(config).eval()


def direct_logprob(model, context, continuation):
    ids = (list(context) + list(continuation))[:-1][-model.config.max_position_embeddings:]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).float(), -1)[0]
    first = len(ids) - len(continuation)
    return sum(float(logp[first + j, t]) for j, t in enumerate(continuation))


@pytest.mark.parametrize("batch_tokens", [1, 40, 4096])
def test_loglikelihood_matches_one_sequence_at_a_time(tiny_model, batch_tokens):
    rng = random.Random(1)
    requests = []
    for _ in range(12):
        context = [rng.randrange(64) for _ in range(rng.randint(1, 15))]
        requests += [(context, [rng.randrange(64) for _ in range(rng.randint(1, 4))]) for _ in range(3)]
    requests.append(([5, 6, 7] * 20, [8, 9]))  # longer than the context: the start is cut
    results = LoglikelihoodScorer(tiny_model, batch_tokens=batch_tokens).score(requests)
    for (context, continuation), result in zip(requests, results):
        assert result.logprob == pytest.approx(direct_logprob(tiny_model, context, continuation), abs=1e-4)
        assert result.tokens == len(continuation)


def test_shared_prompts_run_once(tiny_model):
    scorer = LoglikelihoodScorer(tiny_model)
    context = [1, 2, 3, 4]
    single = [(context, [t]) for t in (10, 11, 12, 13)]  # MMLU-style one-token choices
    rows, _ = scorer._plan(single)
    assert len(rows) == 1
    nested = [(context, [10]), (context, [10, 11]), (context, [10, 11, 12])]  # prefixes of one another
    rows, _ = scorer._plan(nested)
    assert len(rows) == 1
    results = scorer.score(nested)
    for request, result in zip(nested, results):
        assert result.logprob == pytest.approx(direct_logprob(tiny_model, *request), abs=1e-4)


def test_greedy_flag(tiny_model):
    context = [3, 1, 4, 1, 5]
    with torch.no_grad():
        best = int(tiny_model(torch.tensor([context]))[0, -1].argmax())
    worse = (best + 1) % 64
    results = LoglikelihoodScorer(tiny_model).score([(context, [best]), (context, [worse])])
    assert results[0].greedy and not results[1].greedy


# -- tasks as data ------------------------------------------------------------------------------------------

class FakeCompleter:
    """A backend with only `complete` (like the remote one): answers from a table, varying by seed."""

    name = "fake"

    def __init__(self, answers):
        self.answers = answers
        self.calls = []

    def complete(self, prompt, **sampling):
        self.calls.append(sampling)
        text = self.answers(prompt, sampling.get("seed"))

        class Done:
            pass

        done = Done()
        done.text = text
        return [done]


ARITH = [{"id": f"q{i}", "question": f"What is {a} + {b}?", "answer": str(a + b)} for i, (a, b) in
         enumerate([(2, 3), (10, 7), (4, 4)])]


def test_task_file_round_trip(tmp_path):
    (tmp_path / "arith.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ARITH))
    (tmp_path / "arith.yaml").write_text(
        "name: arith\nkind: generation\ndata: arith.jsonl\nprompt: \"Q: {{ question }}\\nA:\"\n"
        "extract: number\nstop: [\"\\n\"]\nfewshot: 1\nmax_tokens: 16\n")
    task = load_task(str(tmp_path / "arith.yaml"))
    assert task.spec.kind == "generation" and len(task.records) == 3
    assert build_prompt(task, task.records[0]) == "Q: What is 10 + 7?\nA: 17\n\nQ: What is 2 + 3?\nA:"
    backend = FakeCompleter(lambda prompt, seed: "It is 5." if "2 + 3?\nA:" in prompt[-12:] else "#### 99")
    result = evaluate(backend, task)
    assert result.metrics["acc"] == pytest.approx(1 / 3)
    assert result.items[0]["pred"] == "5" and result.items[0]["correct"]
    assert all(call["temperature"] == 0 and call["stop"] == ["\n"] for call in backend.calls)


def test_task_file_errors(tmp_path):
    (tmp_path / "bad.yaml").write_text("name: bad\nkind: essay\ndata: x.jsonl\n")
    with pytest.raises(LmforgeError, match="kind must be one of"):
        load_task(str(tmp_path / "bad.yaml"))
    (tmp_path / "odd.yaml").write_text("name: odd\ndata: x.jsonl\npromt: typo\n")
    with pytest.raises(LmforgeError, match="unknown task field"):
        load_task(str(tmp_path / "odd.yaml"))
    with pytest.raises(LmforgeError, match="unknown task"):
        load_task("no-such-task")
    with pytest.raises(LmforgeError, match="no 'cot' variant"):
        make_task({"name": "plain"}, [{"question": "q", "choices": ["a", "b"], "answer": 0}]).spec.variant("cot")


def test_self_consistency_takes_the_majority_of_sampled_answers():
    task = make_task(TaskSpec(name="sc", kind="generation", prompt="{{ question }}", extract="number"), ARITH[:1])
    votes = {0: "#### 5", 1: "#### 6", 2: "#### 5", 3: "#### 7", 4: "#### 6", 5: "#### 5"}
    backend = FakeCompleter(lambda prompt, seed: votes[(seed - 1234) % 6])
    result = evaluate(backend, task, BenchOptions(samples=6))
    item = result.items[0]
    assert item["pred"] == "5" and item["votes"] == 3 and item["correct"]
    assert item["sample_accuracy"] == pytest.approx(0.5)
    assert result.temperature == 0.7 and len({c["seed"] for c in backend.calls}) == 6
    with pytest.raises(LmforgeError, match="temperature"):
        evaluate(backend, task, BenchOptions(samples=3, temperature=0))


# -- MMLU -------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mmlu():
    return load_task("mmlu-cot-281")


def test_mmlu_records(mmlu):
    records = mmlu.records
    assert len(records) == 281
    assert len({r["subject"] for r in records}) == 57
    assert all(len(r["choices"]) == 4 and 0 <= r["answer"] <= 3 and r["rationale"] for r in records)
    assert len({r["id"] for r in records}) == 281


def test_mmlu_prompt_format(mmlu):
    record = next(r for r in mmlu.records if r["id"] == "anatomy/0")
    assert build_prompt(mmlu, record) == (
        "The following are multiple choice questions (with answers) about anatomy.\n\n"
        "Which of the following is the body cavity that contains the pituitary gland?\n"
        "A. Abdominal\nB. Cranial\nC. Pleural\nD. Spinal\nAnswer:")
    assert record["answer"] == 1


def test_mmlu_few_shot_uses_other_questions_of_the_same_subject(mmlu):
    record = next(r for r in mmlu.records if r["id"] == "anatomy/2")
    prompt = build_prompt(mmlu, record, shots=3)
    assert prompt.count("Answer:") == 4 and prompt.count("about anatomy") == 1
    assert prompt.count(record["question"]) == 1 and prompt.endswith(record["question"] + "\nA. " +
                                                                     record["choices"][0] + "\nB. " + record["choices"][1]
                                                                     + "\nC. " + record["choices"][2] + "\nD. "
                                                                     + record["choices"][3] + "\nAnswer:")
    assert "Answer: B\n\n" in prompt  # anatomy/0, the first exemplar, is B


def test_mmlu_chain_of_thought_variant(mmlu):
    cot = mmlu.with_spec(mmlu.spec.variant("cot"))
    record = cot.records[7]
    zero = build_prompt(cot, record, shots=0)
    assert zero.endswith("\nA: Let's think step by step.") and "The answer is" not in zero
    two = build_prompt(cot, record, shots=2)
    assert two.count("The answer is (") == 2 and two.count("Q: ") == 3
    assert cot.spec.extract == "letter" and render(cot.spec.target, record) in "ABCD"


@pytest.mark.slow  # seconds of the fast suite: run with the slow tests
def test_mmlu_subset_on_the_default_model_is_reproducible(default_lm, mmlu):
    options = BenchOptions(limit=6)
    first = evaluate(default_lm, mmlu, options)
    second = evaluate(default_lm, mmlu, options)
    assert [i["logprobs"] for i in first.items] == [i["logprobs"] for i in second.items]
    assert first.metrics == second.metrics
    assert first.n == 6 and 0 <= first.metrics["acc"] <= 1
    assert set(first.groups) == {"abstract_algebra", "anatomy"} and first.groups["abstract_algebra"]["n"] == 5
    for item in first.items:
        assert item["pred"] == max(range(4), key=lambda i: (item["logprobs"][i], -i))
        assert item["pred_norm"] == item["pred"]  # " A".." D" all have two bytes


def test_acc_norm_divides_by_bytes(default_lm):
    task = make_task(TaskSpec(name="norm", prompt="Q: {{ question }}\nA:"),
                     [{"question": "What colour is the sky on a clear day?",
                       "choices": ["blue", "a shade of green that nobody has ever seen"], "answer": 0}])
    item = evaluate(default_lm, task).items[0]
    norm = [lp / len(c.encode()) for lp, c in zip(item["logprobs"], [" blue", " a shade of green that nobody has ever seen"])]
    assert item["pred_norm"] == max(range(2), key=lambda i: norm[i])


def test_generation_through_the_engine_stops_at_stop_strings(default_lm):
    task = make_task(TaskSpec(name="arith", kind="generation", prompt="Question: {{ question }}\nAnswer:",
                              extract="number", stop=["\n"], max_tokens=6), ARITH[:2])
    result = evaluate(default_lm, task)
    assert all("\n" not in out for item in result.items for out in item["outputs"])
    assert 0 <= result.metrics["acc"] <= 1 and "answered" in result.metrics


# -- HumanEval -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def humaneval():
    return load_task("humaneval")


def test_humaneval_canonical_solutions_pass_and_stubs_fail(humaneval):
    from lmforge.eval.bench.code import run_programs
    from lmforge.eval.sandbox import SandboxLimits

    assert len(humaneval.records) == 164
    records = humaneval.records[:4]
    good = [render(humaneval.spec.program, r, completion=r["canonical_solution"]) for r in records]
    bad = [render(humaneval.spec.program, r, completion="    return None\n") for r in records]
    results = run_programs(good + bad, SandboxLimits(timeout=10))
    assert [r.status for r in results[:4]] == ["ok"] * 4
    assert not any(r.passed for r in results[4:])


def test_humaneval_chat_variant_builds_programs_from_replies(humaneval):
    """A reply with the whole function or with the body only; imports of the prompt stay defined."""
    from lmforge.eval.bench.code import run_programs
    from lmforge.eval.bench.extract import extract_code_block
    from lmforge.eval.sandbox import SandboxLimits

    spec = humaneval.spec.variant("chat")
    assert spec.chat and spec.stop == [] and spec.extract == "code_block"
    record = humaneval.records[0]  # has_close_elements(numbers: List[float], ...) needs `from typing import List`
    prompt = render(spec.prompt, record)
    assert record["prompt"] in prompt and prompt.startswith("Complete the following Python function")
    signature = record["prompt"][record["prompt"].index("def "):].split("\n")[0]
    whole = f"Here it is:\n```python\n{signature}\n{record['canonical_solution']}```\nHope it helps."
    body = f"```python\n{record['canonical_solution']}```"
    wrong = f"```python\n{signature}\n    return False\n```"
    programs = [render(spec.program, record, completion=extract_code_block(t)) for t in (whole, body, wrong)]
    assert [r.status for r in run_programs(programs, SandboxLimits(timeout=10))] == ["ok", "ok", "error"]


def test_chat_tasks_go_through_the_chat_template(default_lm, humaneval):
    seen = []

    class Recorder:
        generator = None

        def chat(self, prompt, **sampling):
            seen.append(prompt)
            return "```python\ndef f():\n    pass\n```"

    task = humaneval.limited(1).with_spec(humaneval.spec.variant("chat"))
    result = evaluate(Recorder(), task, BenchOptions())
    assert len(seen) == 1 and seen[0].startswith("Complete the following Python function")
    assert result.items[0]["completions"] == ["def f():\n    pass\n"]  # what ran
    assert result.items[0]["replies"] == ["```python\ndef f():\n    pass\n```"]  # what the model said
    # Locally the prompt is rendered by the model's chat template before generation.
    ids = default_lm.chat_prompt(seen[0])
    assert default_lm.tokenizer.decode(ids).startswith("<|im_start|>system")


def test_pass_at_k_from_sampled_completions(humaneval):
    task = humaneval.limited(2)
    solutions = {r["prompt"]: r["canonical_solution"] for r in task.records}
    # Samples with an even seed offset are right: 3 of 5 per problem.
    backend = FakeCompleter(lambda prompt, seed: solutions[prompt] if (seed - 1234) % 7919 % 2 == 0 else "    return 0\n")
    result = evaluate(backend, task, BenchOptions(samples=5, ks=(1, 2, 5)))
    assert [i["passed"] for i in result.items] == [3, 3]
    assert result.metrics["pass@1"] == pytest.approx(0.6)
    assert result.metrics["pass@2"] == pytest.approx(pass_at_k(5, 3, 2))
    assert result.metrics["pass@5"] == 1.0


def test_humaneval_greedy_on_the_default_model(default_lm, humaneval):
    result = evaluate(default_lm, humaneval, BenchOptions(limit=2, max_tokens=6))
    assert result.n == 2 and 0 <= result.metrics["pass@1"] <= 1
    assert all(len(i["statuses"]) == 1 and len(i["completions"]) == 1 for i in result.items)
    assert result.settings["max_tokens"] == 6


def test_arith_word_problems_are_fixed_and_self_consistent():
    first, second = load_task("arith-word-problems"), load_task("arith-word-problems")
    assert len(first.records) == 200 and len(first.pool) == 8
    assert first.records == second.records  # generated from a fixed seed
    for record in first.records:
        assert extract_answer(record["rationale"], "number") == record["answer"]
    cot = first.with_spec(first.spec.variant("cot"))
    prompt = build_prompt(cot, cot.records[0], shots=2)
    assert prompt.count("####") == 2 and prompt.endswith("Answer: Let's think step by step.")
