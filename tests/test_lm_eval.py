"""The `gptlab` model of lm-evaluation-harness against lm-eval's own `hf` backend on the
transformers export of the same model, and gptlab-eval's accuracies against lm-eval's."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from gptlab.data.tokenizer import train_tokenizer
from gptlab.eval.scoring import score_task
from gptlab.eval.tasks import Example, Task, read_jsonl_task, write_jsonl_task
from gptlab.hf_export import export_to_hf
from tests.kit import small_english_documents, tiny_gpt, write_checkpoint

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("lm_eval") is None or importlib.util.find_spec("transformers") is None,
    reason="lm-eval or transformers missing: pip install -e '.[eval]' (or '.[dev]')",
)
BLOCK = 32


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A gptlab checkpoint and its transformers export, of a model whose large init makes
    predictions confident and context-dependent (a wrong token or position shows)."""
    tokenizer = train_tokenizer(small_english_documents(20), vocab_size=320)
    model = tiny_gpt(vocab_size=320, block_size=BLOCK, init_std=0.2)
    root = tmp_path_factory.mktemp("lm_eval")
    ckpt = write_checkpoint(root / "model.ckpt", model, tokenizer.to_str())
    hf_dir = export_to_hf(model, tokenizer, root / "hf")
    return ckpt, hf_dir


def backends(exported):
    from lm_eval.models.huggingface import HFLM

    from gptlab.eval.harness import GptlabLM

    ckpt, hf_dir = exported
    ours = GptlabLM(ckpt=str(ckpt), batch_size=3)
    theirs = HFLM(pretrained=str(hf_dir), device="cpu", batch_size=3, dtype="float32")
    return ours, theirs


def requests(kind, arguments):
    from lm_eval.api.instance import Instance

    return [Instance(kind, {}, args, i) for i, args in enumerate(arguments)]


PAIRS = [
    ("Return the", " square root of x."),
    ("Return the ", "value of the key"),  # trailing space moves to the continuation
    ("", "Hello world"),  # empty context: end-of-text conditions
    ("This module provides access to the mathematical functions " * 3, "and more."),  # > block
    ("Create a new dictionary with keys from iterable", " and values set to value."),
]


def test_per_example_loglikelihoods_equal_the_hf_backend(exported):
    ours, theirs = backends(exported)
    mine = ours.loglikelihood(requests("loglikelihood", PAIRS))
    hf = theirs.loglikelihood(requests("loglikelihood", PAIRS))
    assert len(mine) == len(PAIRS)
    for (ll, greedy), (hf_ll, hf_greedy) in zip(mine, hf, strict=True):
        assert ll == pytest.approx(hf_ll, abs=1e-4)
        assert greedy == hf_greedy
    assert len({round(ll, 3) for ll, _ in mine}) == len(PAIRS)  # not one constant


def test_rolling_loglikelihoods_equal_the_hf_backend(exported):
    ours, theirs = backends(exported)
    texts = [("The quick brown fox jumps over the lazy dog. " * 6,), ("Short text.",)]
    mine = ours.loglikelihood_rolling(requests("loglikelihood_rolling", texts))
    hf = theirs.loglikelihood_rolling(requests("loglikelihood_rolling", texts))
    assert mine == pytest.approx(hf, abs=1e-4)


def test_greedy_generation_equals_the_hf_backend(exported):
    ours, theirs = backends(exported)
    prompts = [
        ("Return the", {"until": ["\n"], "max_gen_toks": 12, "do_sample": False}),
        ("This module", {"until": ["."], "max_gen_toks": 8, "do_sample": False}),
    ]
    for prompt in prompts:  # one at a time: the hf backend left-pads a batch
        mine = ours.generate_until(requests("generate_until", [prompt]))
        hf = theirs.generate_until(requests("generate_until", [prompt]))
        assert mine == hf
        assert all(stop not in text for text in mine for stop in prompt[1]["until"])


def local_task_yaml(directory, data_file, name):
    """An lm-eval task over a local JSON-lines file in gptlab's {context, choices, label}."""
    text = f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data_file}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""
    (directory / f"{name}.yaml").write_text(text)


def choice_task() -> Task:
    """Choices whose lengths differ, so acc and acc_norm can disagree."""
    contexts = [d.split(".")[0] for d in small_english_documents(40) if len(d.split(".")[0]) > 20]
    words = ["the value", "a list of strings", "None", "an integer or a float", "it", "x"]
    examples = [
        Example(context[:80], tuple(words[(i + k) % len(words)] for k in range(4)), i % 4)
        for i, context in enumerate(contexts[:24])
    ]
    return Task("gptlab_local_mc", "choice", examples)


@pytest.mark.slow  # lm-eval indexes its ~14k task files first
def test_gptlab_eval_accuracies_equal_lm_eval_on_a_local_task(exported, tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from gptlab.training.checkpoint import load_model

    ckpt, hf_dir = exported
    data = tmp_path / "mc.jsonl"
    write_jsonl_task(choice_task(), data)
    local_task_yaml(tmp_path, data, "gptlab_local_mc")
    results = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(hf_dir), "dtype": "float32"},
        tasks=["gptlab_local_mc"],
        task_manager=TaskManager(include_path=str(tmp_path)),
        device="cpu",
        batch_size=4,
        bootstrap_iters=0,
        log_samples=False,
    )["results"]["gptlab_local_mc"]
    model, tokenizer = load_model(ckpt)
    ours = score_task(model, tokenizer, read_jsonl_task(data, "gptlab_local_mc"), batch_size=5)
    assert ours["n"] == 24
    assert ours["acc"] == pytest.approx(results["acc,none"], abs=1e-9)
    assert ours["acc_norm"] == pytest.approx(results["acc_norm,none"], abs=1e-9)
    assert ours["acc"] != ours["acc_norm"]  # the two normalisations are told apart here


@pytest.mark.slow  # lm-eval indexes its ~14k task files first
def test_gptlab_lm_eval_command_scores_a_checkpoint(exported, tmp_path, monkeypatch):
    from gptlab.eval.harness import main

    ckpt, _ = exported
    data = tmp_path / "mc.jsonl"
    write_jsonl_task(choice_task(), data)
    local_task_yaml(tmp_path, data, "gptlab_local_mc")
    out = tmp_path / "out"
    argv = [
        *("gptlab-lm-eval", "run", "--model", "gptlab", "--model_args", f"ckpt={ckpt}"),
        *("--tasks", "gptlab_local_mc", "--include_path", str(tmp_path), "--device", "cpu"),
        *("--batch_size", "4", "--output_path", str(out)),
    ]
    monkeypatch.setattr(sys, "argv", argv)
    main()  # lm-eval's command line, in this process
    (result_file,) = out.rglob("results_*.json")
    scores = json.loads(result_file.read_text())["results"]["gptlab_local_mc"]
    assert 0 <= scores["acc,none"] <= 1 and "acc_norm,none" in scores
