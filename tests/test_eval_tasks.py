"""Zero-shot tasks: loading (JSON lines, the real benchmarks' schemas offline), the built-in tasks
from held-out text, batched scoring against one-sequence-at-a-time scoring, the metrics against
hand computations, gptlab-eval tasks=[...] and the in-loop callback."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from gptlab.cli.evaluate import evaluate
from gptlab.cli.train import train
from gptlab.data.prepare import load_manifest
from gptlab.data.sources import builtin_corpus
from gptlab.data.tokenizer import train_tokenizer
from gptlab.errors import DataError
from gptlab.eval.builtin import (
    docstring_cloze,
    last_word,
    prepared_documents,
    validation_documents,
)
from gptlab.eval.scoring import encode_pair, loglikelihoods, score_task, task_metrics
from gptlab.eval.tasks import Example, Task, load_benchmark, read_jsonl_task, write_jsonl_task
from gptlab.training.checkpoint import load_model
from tests.kit import (
    compose_config,
    short_run,
    small_english_documents,
    tiny_gpt,
    write_checkpoint,
)


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(small_english_documents(40), vocab_size=400)


# The tiny model on the tokenizer's vocabulary. A large init_std makes predictions confident and
# context-dependent, so a token scored with the wrong context or position is far off.
SCORER = {"vocab_size": 400, "block_size": 24, "init_std": 0.3}


# --- scoring --------------------------------------------------------------------------------


def test_encode_pair_moves_trailing_space_to_the_continuation(tokenizer):
    context, continuation = encode_pair(tokenizer, "Return the ", "value")
    assert context == tokenizer.encode("Return the").ids
    assert tokenizer.decode(continuation) == " value"
    assert context + continuation == tokenizer.encode("Return the value").ids
    eot = tokenizer.token_to_id("<|endoftext|>")
    assert encode_pair(tokenizer, "", " value") == ([eot], tokenizer.encode(" value").ids)


def reference_loglikelihood(model, context, continuation):
    """One sequence, unpadded, through the cross-entropy of the last len(continuation)
    positions (cut from the left to block_size + 1 tokens, as lm-eval does)."""
    tokens = (context + continuation)[-(model.config.block_size + 1) :]
    with torch.no_grad():
        logits = model(torch.tensor([tokens[:-1]]))[0, -len(continuation) :]
    target = torch.tensor(continuation)
    nats = F.cross_entropy(logits, target, reduction="sum").item()
    return -nats, bool(torch.equal(logits.argmax(-1), target))


def test_examples_longer_than_the_context_are_left_out_and_counted(tokenizer, caplog):
    model = tiny_gpt(**SCORER)
    short = Example("The value", (" is one", " is two"), 0)
    long = Example("The value", (" is " + "very " * 40 + "long", " is two"), 1)
    task = Task("mixed", "choice", [short, long, short])
    metrics = score_task(model, tokenizer, task)
    assert metrics["n"] == 2 and metrics["skipped"] == 1
    expected = score_task(model, tokenizer, Task("short", "choice", [short, short]))
    assert metrics["gold_bpb"] == pytest.approx(expected["gold_bpb"])
    assert "left out 1 of 3 examples" in caplog.text


def test_batched_loglikelihoods_equal_one_sequence_at_a_time(tokenizer):
    model = tiny_gpt(**SCORER)
    texts = [
        ("Return the", " square root of x."),
        ("", "Hello world"),  # empty context: end-of-text conditions
        ("The quick brown fox jumps over the lazy dog " * 4, "and again"),  # > block_size
        ("a", " b"),
        ("Create a new", " dictionary"),
    ]
    requests = [encode_pair(tokenizer, c, x) for c, x in texts]
    assert len(requests[2][0]) + len(requests[2][1]) > 25  # truncation is exercised
    expected = [reference_loglikelihood(model, c, x) for c, x in requests]
    for batch_size in (1, 2, 16):
        got = loglikelihoods(model, requests, batch_size)
        for (ll, greedy), (ref_ll, ref_greedy) in zip(got, expected, strict=True):
            assert ll == pytest.approx(ref_ll, abs=1e-4)
            assert greedy == ref_greedy
    # A greedy continuation is recognised as greedy.
    context = tokenizer.encode("Return the").ids
    argmax = model(torch.tensor([context]))[0, -1].argmax().item()
    assert loglikelihoods(model, [(context, [argmax])])[0][1] is True
    with pytest.raises(ValueError, match="needs a context token"):
        loglikelihoods(model, [(context, [])])
    with pytest.raises(ValueError, match="needs a context token"):
        loglikelihoods(model, [([], context)])


def test_choice_metrics_match_a_hand_computation():
    # lm-eval's acc_norm divides by len(choice) without the delimiter: in example 1 that picks
    # choice 1 (-3/2 < -5.5/4); counting the delimiter's space would pick choice 0 (-1 > -1.1).
    task = Task(
        "t",
        "choice",
        [
            Example("c0", ("a", "bbbb"), 1),  # acc picks 0 (-2 > -4), acc_norm 1 (-2 < -1)
            Example("c1", ("ab", "abcd"), 1),  # acc picks 0, acc_norm 1 (see above)
            Example("c2", ("x", "y", "zz"), 2),  # acc picks 2, acc_norm 2
            Example("c3", ("p", "q"), 0),  # a tie: the first choice wins, as np.argmax
        ],
    )
    lls = [-2.0, -4.0, -3.0, -5.5, -3.0, -2.5, -1.0, -7.0, -7.0]
    metrics = task_metrics(task, [(ll, False) for ll in lls])
    assert metrics["n"] == 4
    assert metrics["acc"] == pytest.approx(2 / 4)  # examples 2 and 3
    assert metrics["acc_norm"] == pytest.approx(4 / 4)
    chance = (1 / 2 + 1 / 2 + 1 / 3 + 1 / 2) / 4
    assert metrics["chance"] == pytest.approx(chance)
    assert metrics["acc_centred"] == pytest.approx((0.5 - chance) / (1 - chance))
    assert metrics["acc_stderr"] == pytest.approx(math.sqrt(0.25 / 4))
    # Gold continuations, with the delimiter: " bbbb", " abcd", " zz", " p" = 5+5+3+2 bytes.
    assert metrics["gold_bpb"] == pytest.approx((4 + 5.5 + 1 + 7) / (math.log(2) * 15))


def test_target_metrics_match_a_hand_computation():
    task = Task("t", "target", [Example("a", (" bc",), 0), Example("d", (" é",), 0)])
    metrics = task_metrics(task, [(-1.0, True), (-3.0, False)])
    assert metrics["acc"] == 0.5
    assert metrics["ppl"] == pytest.approx(math.exp(2.0))
    assert metrics["bpb"] == pytest.approx(4.0 / (math.log(2) * (3 + 3)))  # " é" is 3 bytes


# --- task files and benchmarks ---------------------------------------------------------------


def test_jsonl_tasks_round_trip(tmp_path):
    choice = Task("mc", "choice", [Example("Q", ("yes", "no"), 1), Example("R", ("a", "b"), 0)])
    cloze = Task("cl", "target", [Example("The end of the", (" line",), 0)])
    for task in (choice, cloze):
        write_jsonl_task(task, tmp_path / f"{task.name}.jsonl")
        assert read_jsonl_task(tmp_path / f"{task.name}.jsonl") == task


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"context": "Q", "choices": ["a", "b"], "label": 2}', r"x.jsonl:2: label 2 is not"),
        ('{"context": "Q", "choices": ["a"], "label": 0}', r"x.jsonl:2: .* needs >= 2 choices"),
        ('{"context": "Q", "answer": "a"}', r"x.jsonl:2: missing \['choices', 'label'\]"),
        ('{"context": "Q", "choices": "ab", "label": 0}', r"x.jsonl:2: choices must be a list"),
        ("{not json", r"x.jsonl:2: not valid JSON"),
    ],
)
def test_bad_task_lines_name_file_and_line(tmp_path, line, message):
    path = tmp_path / "x.jsonl"
    path.write_text('{"context": "Q", "choices": ["a", "b"], "label": 0}\n' + line + "\n")
    with pytest.raises(DataError, match=message):
        read_jsonl_task(path)


def test_a_file_of_unknown_records_is_refused(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"text": "hello"}\n')
    with pytest.raises(DataError, match=r"x.jsonl:1: expected an object with keys"):
        read_jsonl_task(path)


HELLASWAG = {
    "ind": 4,
    "activity_label": "Removing ice from car",
    "ctx_a": "Then, the man writes over the snow covering the window of a car, and a woman "
    "wearing winter clothes smiles.",
    "ctx_b": "then",
    "ctx": "",
    "endings": [
        ", the man adds wax to the windshield and cuts it.",
        ", a person board a ski lift, while two men supporting the head of the person [title] "
        "wearing winter clothes.",
        ", the man puts on a christmas coat, knitted with netting.",
        ", the man continues removing the snow on his car.",
    ],
    "source_id": "activitynet~v_-1IBHYS3L-Y",
    "split": "train",
    "split_type": "indomain",
    "label": "3",
}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_hellaswag_records_map_as_lm_eval_maps_them(tmp_path):
    wikihow = HELLASWAG | {
        "activity_label": "Home and Garden",
        "ctx_a": "[header] How to clean a grill [title] Heat the grill.",
        "ctx_b": "",
        "endings": ["[step] Scrub it.", "Paint it  red.", "Sell it.", "Eat it."],
        "label": "0",
    }
    task = load_benchmark("hellaswag", write_jsonl(tmp_path / "h.jsonl", [HELLASWAG, wikihow]))
    first, second = task.examples
    assert first.context == (
        "Removing ice from car: Then, the man writes over the snow covering the window of a car, "
        "and a woman wearing winter clothes smiles. Then"
    )
    assert first.choices[1] == (
        ", a person board a ski lift, while two men supporting the head of the person. "
        "wearing winter clothes."
    )
    assert first.label == 3
    assert second.context == "Home and Garden: How to clean a grill. Heat the grill."
    assert second.choices == (" Scrub it.", "Paint it red.", "Sell it.", "Eat it.")
    assert (second.label, task.kind, task.delimiter) == (0, "choice", " ")


def test_hellaswag_mapping_equals_lm_eval_preprocessing(tmp_path):
    datasets = pytest.importorskip("datasets")
    utils = pytest.importorskip(
        "lm_eval.tasks.hellaswag.utils", reason="lm-eval missing: pip install -e '.[eval]'"
    )
    records = [HELLASWAG, HELLASWAG | {"ctx_a": "[header] A [title] B [step] C.", "label": "1"}]
    theirs = utils.process_docs(datasets.Dataset.from_list(records))
    ours = load_benchmark("hellaswag", write_jsonl(tmp_path / "h.jsonl", records)).examples
    for doc, example in zip(theirs, ours, strict=True):
        assert (doc["query"], tuple(doc["choices"]), doc["gold"]) == (
            example.context,
            example.choices,
            example.label,
        )


def test_arc_piqa_and_lambada_records_map_to_lm_eval_prompts(tmp_path):
    pytest.importorskip("pyarrow")
    import pyarrow as pa
    import pyarrow.parquet as pq

    arc = [
        {
            "id": "Mercury_7175875",
            "question": "Which is a mineral?",
            "choices": {"text": ["glass", "quartz", "plastic"], "label": ["A", "B", "C"]},
            "answerKey": "B",
        },
        {
            "id": "NYSEDREGENTS_2015_4_8",
            "question": "What melts ice?",
            "choices": {"text": ["heat", "cold", "dark", "wind"], "label": ["1", "2", "3", "4"]},
            "answerKey": "1",
        },
    ]
    pq.write_table(pa.Table.from_pylist(arc), tmp_path / "arc.parquet")  # Parquet, as on the Hub
    task = load_benchmark("arc_easy", str(tmp_path / "arc.parquet"))
    assert task.examples[0] == Example(
        "Question: Which is a mineral?\nAnswer:", ("glass", "quartz", "plastic"), 1
    )
    assert task.examples[1].label == 0

    piqa = [{"goal": "Dry a towel", "sol1": "Hang it up.", "sol2": "Fold it wet.", "label": 0}]
    task = load_benchmark("piqa", write_jsonl(tmp_path / "piqa.jsonl", piqa))
    assert task.examples == [
        Example("Question: Dry a towel\nAnswer:", ("Hang it up.", "Fold it wet."), 0)
    ]

    lambada = [{"text": "he looked at the door and then said goodbye to his mother"}]
    task = load_benchmark("lambada_openai", write_jsonl(tmp_path / "lambada.jsonl", lambada))
    assert task.kind == "target"
    assert task.examples == [
        Example("he looked at the door and then said goodbye to his", (" mother",), 0)
    ]
    assert task.continuation(" mother") == " mother"  # scored as given, no delimiter


def test_a_benchmark_file_in_another_schema_is_refused(tmp_path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"question": "Q?", "answer": "A"}])
    with pytest.raises(DataError, match="not in the baber/piqa schema"):
        load_benchmark("piqa", path)


# --- the built-in tasks ----------------------------------------------------------------------


def test_validation_documents_are_the_held_out_split(tiny_data_dir):
    val, train = validation_documents(tiny_data_dir), prepared_documents(tiny_data_dir, "train")
    documents = small_english_documents()  # what tiny_data_dir was prepared from
    assert 0 < len(val) < 0.1 * len(documents)
    assert not set(val) & set(train)  # byte-level BPE decodes exactly: the same strings
    assert set(val) | set(train) == set(documents)


def test_builtin_tasks_hold_only_held_out_text_with_length_matched_distractors():
    held_out = builtin_corpus()[::20]  # the tasks are made from whatever documents they get
    cloze = docstring_cloze(held_out)
    assert len(cloze.examples) > 300
    labels = [e.label for e in cloze.examples]
    assert set(labels) == {0, 1, 2, 3} and max(np.bincount(labels)) < 0.4 * len(labels)
    for example in cloze.examples:
        gold = example.choices[example.label]
        assert any(example.context + " " + gold in doc for doc in held_out)
        assert len(set(example.choices)) == 4
        size = len(gold.encode())
        assert all(abs(len(c.encode()) - size) <= max(8, size / 4) for c in example.choices)
    words = last_word(held_out)
    assert len(words.examples) > 200
    for example in words.examples:
        (target,) = example.choices
        assert target[0] == " " and target[1:].isalpha()
        assert any(example.context + target in doc for doc in held_out)


@pytest.mark.slow
def test_a_random_model_scores_chance_on_the_builtin_tasks(tokenizer):
    """Over many examples, a randomly initialised model's accuracy is within 4 binomial
    standard errors of chance (1/4), and it almost never produces the last word greedily: the
    answer hides in no surface feature (position, length, tokenization).

    Distractors drawn by length with ties broken by text failed this (0.39): they were code
    more often than the answers, with more tokens per byte, and a random model prefers fewer
    tokens."""
    documents = builtin_corpus()[::10]  # a random model has seen nothing: any text will do
    model = tiny_gpt(vocab_size=400, block_size=128, tie_weights=False)
    # Short contexts keep the test fast; the answer's place in the text does not change.
    cloze = docstring_cloze(documents, context_words=8, min_context_words=4)
    for task in (cloze, last_word(documents)):
        requests = [
            encode_pair(tokenizer, e.context, task.continuation(c))
            for e in task.examples
            for c in e.choices
        ]
        metrics = task_metrics(task, loglikelihoods(model, requests, batch_size=64))
        n = metrics["n"]
        if task.kind == "choice":
            assert n > 2000
            margin = 4 * math.sqrt(0.25 * 0.75 / n)
            assert abs(metrics["acc"] - 0.25) < margin, metrics
            assert abs(metrics["acc_norm"] - 0.25) < margin, metrics
        else:
            assert n > 500 and metrics["acc"] < 0.01, metrics


# --- gptlab-eval and the callback -------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tiny_data_dir, tmp_path_factory):
    vocab_size = load_manifest(tiny_data_dir)["vocab_size"]
    model = tiny_gpt(**SCORER | {"vocab_size": vocab_size, "block_size": 64})  # an 80-byte choice
    tokenizer_json = (tiny_data_dir / "tokenizer.json").read_text()
    path = tmp_path_factory.mktemp("ckpt") / "model.ckpt"
    return write_checkpoint(path, model, tokenizer_json, data_dir=tiny_data_dir)


def test_gptlab_eval_scores_builtin_and_file_tasks(checkpoint, tiny_data_dir, tmp_path, capsys):
    file_task = Task("mine", "choice", [Example("Return the", ("value", "banana"), 0)] * 3)
    write_jsonl_task(file_task, tmp_path / "mine.jsonl")
    out = tmp_path / "results.json"
    overrides = [
        f"ckpt_path={checkpoint}",
        f"tasks=[builtin,{tmp_path / 'mine.jsonl'}]",
        "max_examples=5",
        f"results_file={out}",
    ]
    results = evaluate(compose_config("eval", overrides, tmp_path))
    assert json.loads(out.read_text()) == results
    tasks = results["tasks"]
    assert list(tasks) == ["docstring_cloze", "last_word", "mine"]
    assert tasks["mine"]["n"] == 3 and tasks["mine"]["acc"] in (0.0, 1.0)
    assert 0 < tasks["docstring_cloze"]["n"] <= 5 and tasks["docstring_cloze"]["gold_bpb"] > 0
    printed = capsys.readouterr().out
    assert "docstring_cloze" in printed and "examples/s" in printed
    # The same subsample gives the same numbers; the file task agrees with a direct scoring.
    again = evaluate(compose_config("eval", overrides[:-1], tmp_path))["tasks"]
    assert again["docstring_cloze"]["gold_bpb"] == tasks["docstring_cloze"]["gold_bpb"]
    model, tokenizer = load_model(checkpoint)
    direct = score_task(model, tokenizer, read_jsonl_task(tmp_path / "mine.jsonl"))
    assert direct["gold_bpb"] == pytest.approx(tasks["mine"]["gold_bpb"])


def test_gptlab_eval_refuses_an_unknown_task(checkpoint, tmp_path):
    with pytest.raises(ValueError, match=r"unknown task 'hellaswag2'; choose 'builtin', one of"):
        evaluate(
            compose_config("eval", [f"ckpt_path={checkpoint}", "tasks=[hellaswag2]"], tmp_path)
        )


def test_eval_tasks_callback_logs_scalars_and_hparams(tiny_data_dir, tmp_path):
    eval_tasks = [
        "callbacks=eval_tasks",
        "callbacks.eval_tasks.every_n_steps=2",
        "callbacks.eval_tasks.max_examples=4",
    ]
    room = "model.block_size=64"  # for an 80-byte choice
    train(short_run(tiny_data_dir, tmp_path, 3, room, "data.loader.batch_size=8", *eval_tasks))
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()
    for name in ("docstring_cloze/acc", "docstring_cloze/gold_bpb", "last_word/acc"):
        scalars = events.Scalars(f"eval/{name}")
        assert [e.step for e in scalars] == [2, 3]  # every 2 steps, and at the end
    assert all(e.value > 0 for e in events.Scalars("eval/docstring_cloze/gold_bpb"))
    assert [e.step for e in events.Scalars("eval/seconds")] == [2, 3]
    # The HParams table lists the eval curves as metrics (it shows each one's last value).
    content = events.PluginTagToContent("hparams")["_hparams_/experiment"]
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content).experiment
    metrics = {info.name.tag for info in experiment.metric_infos}
    assert {"eval/docstring_cloze/acc_norm", "eval/last_word/acc", "loss/val"} <= metrics
