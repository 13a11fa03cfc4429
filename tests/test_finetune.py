"""Finetuning: init_from, SFT data (templates, loss masks, padding), classification, LoRA runs."""

from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra.utils import instantiate
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from gptlab.cli.train import train
from gptlab.data.prepare import prepare_dataset
from gptlab.data.sources import builtin_corpus, builtin_docstring_records
from gptlab.data.tokenizer import eot_id, load_tokenizer
from gptlab.errors import DataError
from gptlab.finetune.base import IGNORE_INDEX, split_examples
from gptlab.finetune.classify import PAD_ID, LitClassifier, package_examples
from gptlab.finetune.sft import LitSFT, PromptTemplate, SFTDataModule, collate, encode, render
from gptlab.model import GPT, GPTConfig
from gptlab.training.build import build_module
from gptlab.training.callbacks.samples import ResponseSampleCallback
from gptlab.training.checkpoint import load_checkpoint, load_model
from gptlab.training.lit_gpt import next_token_loss
from tests.kit import (
    FT_GPT,
    FT_MODEL,
    QUIET,
    compose_config,
    cpu_trainer,
    finetune_config,
    small_english_documents,
)

# Two steps with a checkpoint at the end: enough to resume from.
SHORT_CLASSIFY = [
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
    "scheduler.warmup_steps=1",
    "finetune_data.loader.batch_size=8",
]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def words(count: int) -> list[str]:
    text = " ".join(small_english_documents(40))
    return sorted(set(re.findall(r"\b[a-z]{4,8}\b", text)))[:count]


def instruction_records() -> list[dict]:
    """A yes/no question about a word, in both formats (Alpaca-style and chat)."""
    answer = {True: "yes", False: "no"}
    alpaca = [
        {"instruction": "Is this a long word?", "input": w, "output": answer[len(w) > 5]}
        for w in words(160)[::2]
    ]
    chat = [
        {
            "messages": [
                {"role": "user", "content": f"Is {w} a long word?"},
                {"role": "assistant", "content": answer[len(w) > 5]},
            ]
        }
        for w in words(160)[1::2]
    ]
    return alpaca + chat


@pytest.fixture(scope="module")
def tokenizer(tiny_data_dir):
    return load_tokenizer(tiny_data_dir / "tokenizer.json")


@pytest.fixture(scope="module")
def pretrained_ckpt(tiny_data_dir, tmp_path_factory) -> Path:
    """A tiny LM pretrained for a few steps by gptlab-train, as users make them."""
    out = tmp_path_factory.mktemp("pretrain")
    overrides = [
        *FT_MODEL,
        *QUIET,
        f"corpus.dir={tiny_data_dir}",
        "data.loader.batch_size=16",
        "trainer.max_steps=40",
        "trainer.val_check_interval=40",
        "scheduler.warmup_steps=4",
        "callbacks.samples=null",
    ]
    train(compose_config("train", overrides, out))
    return out / "checkpoints" / "last.ckpt"


# ----------------------------------------------------------------------------- SFT data


def test_only_response_tokens_and_their_end_of_text_are_targets(tokenizer):
    eot = eot_id(tokenizer)
    segments = [
        ("### System:\nBe brief.\n\n", False),
        ("### User:\nHi\n\n### Assistant:\n", False),
        ("Hello.", True),
        ("### User:\nBye\n\n### Assistant:\n", False),
        ("Goodbye.", True),
    ]
    inputs, targets = encode(segments, tokenizer, eot, max_length=200)

    expected_ids, expected_targets = [eot], []
    for text, is_response in segments:
        piece = tokenizer.encode(text).ids + ([eot] if is_response else [])
        expected_ids += piece
        expected_targets += piece if is_response else [IGNORE_INDEX] * len(piece)
    assert inputs == expected_ids[:-1]  # starts with end-of-text, as pretraining documents do
    assert targets == expected_targets
    assert targets.count(eot) == 2  # the model learns to stop after each response

    # Cut so that only the first response survives; cut earlier, nothing is left to learn.
    first_end = expected_targets.index(eot) + 1
    assert encode(segments, tokenizer, eot, first_end)[1] == expected_targets[:first_end]
    first_response = expected_targets.index(next(t for t in expected_targets if t >= 0))
    assert encode(segments, tokenizer, eot, max_length=first_response) is None


def test_sample_prompts_are_the_ids_that_precede_the_last_response_in_training(
    tiny_data_dir, tmp_path
):
    """Training tokenizes segment by segment; a prompt tokenized as one text can differ where
    segments meet, and the model would then be sampled on ids it was never trained on."""
    chat = {
        "messages": [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Is tuple a long word?"},
            {"role": "assistant", "content": "no"},
            {"role": "user", "content": "And dictionary?"},
            {"role": "assistant", "content": "yes"},
        ]
    }
    alpaca = {"instruction": "Is this a long word?", "input": "tuple", "output": "no"}
    for record in (chat, alpaca):
        data = write_jsonl(tmp_path / "one.jsonl", [record] * 4)
        datamodule = SFTDataModule(
            source="jsonl",
            paths=[str(data)],
            max_length=256,
            val_fraction=0.25,
            tokenizer_path=str(tiny_data_dir / "tokenizer.json"),
        )
        datamodule.setup()
        inputs, targets = datamodule.val_items[0]
        # The last response starts where the last run of targets that are not ignored starts.
        start = max(
            t for t in range(len(targets)) if targets[t] != IGNORE_INDEX and targets[t - 1] < 0
        )
        callback = ResponseSampleCallback(num_examples=1)
        callback.on_fit_start(SimpleNamespace(datamodule=datamodule, logger=None), None)
        assert callback.prompt_ids(datamodule.tokenizer) == [inputs[: start + 1]]
        assert callback.references == [record.get("output", "yes")]


def test_records_render_through_the_template_and_bad_records_are_named(tmp_path):
    template = PromptTemplate(instruction="Q: {instruction}\nA: ")
    assert render({"instruction": "Add.", "output": "4"}, template, "x") == [
        ("Q: Add.\nA: ", False),
        ("4", True),
    ]
    with_input = render({"instruction": "Add.", "input": "2 2", "output": "4"}, template, "x")
    assert with_input[0][0] == "### Instruction:\nAdd.\n\n### Input:\n2 2\n\n### Response:\n"

    path = tmp_path / "data.jsonl"
    bad_lines = [
        ({"instruction": "Add."}, r"data\.jsonl, line 2: expected a JSON object with key 'output'"),
        ({"messages": [{"role": "bot", "content": "x"}]}, r"line 2, message 0: role 'bot'"),
        ({"messages": [{"role": "user", "content": "x"}]}, "line 2: no assistant message"),
        ({"messages": "hi"}, "line 2: key 'messages' holds str, expected a list"),
    ]
    for record, message in bad_lines:
        write_jsonl(path, [{"instruction": "Add.", "output": "4"}, record])
        datamodule = SFTDataModule(source="jsonl", paths=[str(path)])
        with pytest.raises(DataError, match=message):
            datamodule.load_examples()

    with pytest.raises(ValueError, match=r"data\.template\.user uses \['name'\].*\{content\}"):
        PromptTemplate(user="{name}: {content}")
    with pytest.raises(ValueError, match="source 'jsonl' needs files"):
        SFTDataModule(source="jsonl")


def test_right_padding_changes_nothing_at_real_positions(tokenizer):
    """A causal decoder never looks ahead, so padding after an example cannot reach it."""
    eot = eot_id(tokenizer)
    examples = [
        [("Say hi.\n", False), ("hi", True)],
        [("Tell me a long story.\n", False), ("Once upon a time.", True)],
    ]
    items = [encode(segments, tokenizer, eot, 64) for segments in examples]
    x, y = collate(items, pad_id=eot)
    short = len(items[0][0])
    assert short < x.size(1) and (y[0, short:] == IGNORE_INDEX).all()

    lit = LitSFT(FT_GPT).eval()
    with torch.no_grad():
        padded = lit.model(x)
        alone = lit.model(x[:1, :short])
        loss = next_token_loss(padded, y)
        per_example = [next_token_loss(lit.model(x[i : i + 1]), y[i : i + 1]) for i in (0, 1)]
    torch.testing.assert_close(padded[0, :short], alone[0], atol=1e-5, rtol=0)
    # The batch loss is the mean over the response tokens of both examples, padding ignored.
    counts = [(y[i] != IGNORE_INDEX).sum() for i in (0, 1)]
    expected = sum(loss_i * n for loss_i, n in zip(per_example, counts, strict=True)) / sum(counts)
    torch.testing.assert_close(loss, expected)


def test_split_is_seeded_and_holds_out_at_least_one_example():
    train_a, val_a = split_examples(list(range(50)), 0.1, seed=3)
    train_b, val_b = split_examples(list(range(50)), 0.1, seed=3)
    assert (train_a, val_a) == (train_b, val_b) and len(val_a) == 5
    assert sorted(train_a + val_a) == list(range(50))
    assert len(split_examples([1, 2, 3], 0.01, seed=0)[1]) == 1
    with pytest.raises(DataError, match="cannot be split"):
        split_examples([1], 0.5, seed=0)


def test_split_seed_fixes_the_held_out_examples_while_seed_changes_the_order(
    tiny_data_dir, tmp_path
):
    records = [{"instruction": f"Say {w}.", "output": w} for w in words(40)]
    path = write_jsonl(tmp_path / "say.jsonl", records)

    def datamodule(seed: int, split_seed: int | None = None) -> SFTDataModule:
        tokenizer_path = str(tiny_data_dir / "tokenizer.json")
        return SFTDataModule(
            source="jsonl", paths=[str(path)], batch_size=40, val_fraction=0.25, seed=seed,
            split_seed=split_seed, tokenizer_path=tokenizer_path,
        )  # fmt: skip

    def first_batch(dm: SFTDataModule) -> torch.Tensor:
        return next(iter(dm.train_dataloader()))[0]

    a, b = datamodule(seed=1, split_seed=7), datamodule(seed=2, split_seed=7)
    assert a.splits[1] == b.splits[1]  # the same held-out examples
    assert sorted(map(str, a.splits[0])) == sorted(map(str, b.splits[0]))
    assert not torch.equal(first_batch(a), first_batch(b))  # in another order
    assert datamodule(seed=1).splits[1] != a.splits[1]  # by default the seed picks them too


# ----------------------------------------------------------------------------- init_from


def test_init_from_loads_the_weights_and_names_every_differing_field(
    pretrained_ckpt, tiny_data_dir, tmp_path
):
    def build(*extra: str):
        cfg = compose_config(
            "train",
            [*FT_MODEL, f"corpus.dir={tiny_data_dir}", f"init_from={pretrained_ckpt}", *extra],
            tmp_path,
        )
        return build_module(cfg, instantiate(cfg.data.loader))

    lit = build("model.dropout=0.1")  # dropout only regularises: it may differ
    expected = load_checkpoint(pretrained_ckpt)["state_dict"]
    for name, tensor in lit.state_dict().items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0)

    with pytest.raises(ValueError) as error:
        build("model.n_layer=3", "model.position=rope")
    assert "model.n_layer: 3 here, 2 in the checkpoint" in str(error.value)
    assert "model.position: 'rope' here, 'learned' in the checkpoint" in str(error.value)
    assert "model.n_layer=2 model.position=learned" in str(error.value)

    other = tmp_path / "other"
    prepare_dataset(small_english_documents(40), other, vocab_size=400, progress=False)
    with pytest.raises(ValueError, match="tokenizer differs"):
        build(f"corpus.dir={other}", "model.vocab_size=512")


# ----------------------------------------------------------------------------- SFT runs


def response_loss(model: torch.nn.Module, datamodule: SFTDataModule) -> float:
    """Mean loss over the response tokens of the held-out examples."""
    total, count = 0.0, 0
    with torch.no_grad():
        for x, y in datamodule.val_dataloader():
            n = int((y != IGNORE_INDEX).sum())
            total += float(next_token_loss(model(x), y)) * n
            count += n
    return total / count


def sft_config(tmp_path: Path, tiny_data_dir: Path, pretrained_ckpt: Path, *extra: str):
    data = write_jsonl(tmp_path / "instructions.jsonl", instruction_records())
    return finetune_config(
        tmp_path,
        tiny_data_dir,
        "sft",
        f"init_from={pretrained_ckpt}",
        "finetune_data.source=jsonl",
        f"finetune_data.paths=[{data}]",
        "finetune_data.loader.val_fraction=0.2",
        # the checkpoint brings its tokenizer
        "finetune_data.loader.tokenizer_path=/nonexistent/tokenizer.json",
        "scheduler.warmup_steps=5",
        *extra,
    )


def test_sft_learns_the_responses_with_the_checkpoints_tokenizer(
    pretrained_ckpt, tiny_data_dir, tmp_path
):
    cfg = sft_config(
        tmp_path,
        tiny_data_dir,
        pretrained_ckpt,
        "optimizer.lr=3e-3",
        "trainer.max_steps=60",
        "trainer.val_check_interval=30",
        "callbacks.responses.every_n_steps=30",
        "callbacks.responses.max_new_tokens=6",
    )
    base, tokenizer = load_model(pretrained_ckpt)
    datamodule = SFTDataModule(
        source="jsonl",
        paths=list(cfg.finetune_data.paths),
        max_length=64,
        val_fraction=0.2,
        seed=cfg.seed,
    )
    datamodule.use_tokenizer(tokenizer.to_str())
    before = response_loss(base, datamodule)

    results = train(cfg)
    assert results["val_loss"] < 0.5 * before, (before, results["val_loss"])
    # The exported model scores the held-out responses as the run's loss/val said.
    finetuned, _ = load_model(tmp_path / "checkpoints" / "last.ckpt")
    assert response_loss(finetuned, datamodule) == pytest.approx(results["val_loss"], rel=1e-4)
    assert len(results["samples"]) == 3 and results["samples"][0].startswith("### Instruction:")
    tags = EventAccumulator(str(tmp_path / "tensorboard")).Reload().Tags()["tensors"]
    assert {"samples/reference_0/text_summary", "samples/0/text_summary"} <= set(tags)


class RecordingSFT(LitSFT):
    """Saves, per rank, the batches it trains on and the gradients the optimizer will apply."""

    out_dir: Path

    def training_step(self, batch, batch_idx):
        self.batches = [*getattr(self, "batches", []), batch]
        return super().training_step(batch, batch_idx)

    def on_before_optimizer_step(self, optimizer):
        super().on_before_optimizer_step(optimizer)
        grads = {name: p.grad.clone() for name, p in self.model.named_parameters()}
        torch.save((self.batches, grads), self.out_dir / f"rank{self.global_rank}.pt")


@pytest.mark.parametrize(
    ("devices", "batch_size"),
    [(1, 2), pytest.param(2, 1, marks=pytest.mark.slow)],  # 2 micro-batches x 2, 2 x 1 x 2 ranks
)
def test_an_accumulated_sft_step_takes_the_mean_over_all_its_response_tokens(
    tiny_data_dir, tmp_path, devices, batch_size
):
    # Responses of 1 to 81 words: however the 4 training examples are split into micro-batches
    # (and ranks), the micro-batches hold different numbers of response tokens.
    records = [
        {"instruction": f"Say {n} words.", "output": " ".join(words(81)[:n])}
        for n in (1, 3, 9, 27, 81)
    ]
    datamodule = SFTDataModule(
        source="jsonl",
        paths=[str(write_jsonl(tmp_path / "lengths.jsonl", records))],
        max_length=256,
        batch_size=batch_size,
        val_fraction=0.2,
        tokenizer_path=str(tiny_data_dir / "tokenizer.json"),
    )
    config = GPTConfig(**{**FT_GPT, "block_size": 256})
    torch.manual_seed(0)
    lit = RecordingSFT(config.to_dict())
    lit.out_dir = tmp_path
    initial = {k: v.clone() for k, v in lit.model.state_dict().items()}
    trainer = cpu_trainer(
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        max_steps=1,
        accumulate_grad_batches=2,
        limit_val_batches=0,
        enable_checkpointing=False,
    )
    trainer.fit(lit, datamodule=datamodule)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(devices)]
    batches = [batch for rank_batches, _ in ranks for batch in rank_batches]
    grads = ranks[0][1]
    counts = [int((y != IGNORE_INDEX).sum()) for _, y in batches]
    assert len(counts) == 2 * devices and len(set(counts)) == len(counts)

    # By hand: one mean over the response tokens of every micro-batch of every rank together.
    model = GPT(config)
    model.load_state_dict(initial)
    per_token = []
    for x, y in batches:
        real = y != IGNORE_INDEX
        log_probs = model(x).log_softmax(dim=-1)[real]  # (response tokens, vocab)
        per_token.append(-log_probs.gather(1, y[real][:, None]).squeeze(1))
    token_mean = torch.cat(per_token).mean()
    expected = torch.autograd.grad(token_mean, list(model.parameters()), retain_graph=True)
    for (name, _), grad in zip(model.named_parameters(), expected, strict=True):
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-7)

    # The mean of the micro-batch means, which weighs tokens unequally, differs.
    batch_means = torch.stack([losses.mean() for losses in per_token]).mean()
    unequal = torch.autograd.grad(batch_means, model.wte.weight)[0]
    assert not torch.allclose(unequal, grads["wte.weight"], rtol=1e-2, atol=1e-6)


def test_lora_sft_trains_adapters_only_and_exports_them_merged(
    pretrained_ckpt, tiny_data_dir, tmp_path, capsys
):
    cfg = sft_config(
        tmp_path,
        tiny_data_dir,
        pretrained_ckpt,
        "finetune.method=lora",
        "finetune.lora.targets=[*.attn.*,*.mlp.*]",
        "optimizer.lr=1e-2",
        "trainer.max_steps=8",
        "trainer.val_check_interval=8",
        "callbacks.responses=null",
    )
    train(cfg)
    printed = capsys.readouterr().out
    assert re.search(
        r"finetuning \(sft, lora, rank 8, 0 frozen blocks\): [\d,]+ parameters trained \(\d",
        printed,
    )

    checkpoint = tmp_path / "checkpoints" / "last.ckpt"
    finetuned = load_checkpoint(checkpoint)["state_dict"]
    for name, tensor in load_checkpoint(pretrained_ckpt)["state_dict"].items():
        assert torch.equal(finetuned[name], tensor), name  # the base weights did not move
    assert finetuned["model.blocks.0.mlp.c_fc.lora_B"].abs().sum() > 0

    merged, _ = load_model(checkpoint)  # adapters merged in: a plain GPT
    lit = LitSFT.load_from_checkpoint(checkpoint).eval()
    base, _ = load_model(pretrained_ckpt)
    x = torch.randint(0, 512, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(merged(x), lit.model(x), atol=1e-5, rtol=0)
        assert (merged(x) - base(x)).abs().max() > 1e-3


# ----------------------------------------------------------------------------- classification


def test_classifier_reads_each_examples_last_real_token():
    lit = LitClassifier(FT_GPT, labels=["a", "b", "c"]).eval()
    long = torch.randint(0, 512, (1, 12))
    short = torch.randint(0, 512, (1, 7))
    batch = torch.cat([long, torch.cat([short, torch.full((1, 5), PAD_ID)], dim=1)])
    with torch.no_grad():
        together = lit(batch)
        torch.testing.assert_close(together[1], lit(short)[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(together[0], lit(long)[0], atol=1e-5, rtol=0)
    assert together.shape == (2, 3)


def test_freeze_blocks_and_lora_choose_what_trains():
    def trainable(finetune: dict) -> set[str]:
        lit = LitClassifier(FT_GPT, finetune={"task": "classify", **finetune}, labels=["a", "b"])
        return {name for name, p in lit.named_parameters() if p.requires_grad}

    with_one_frozen = trainable({"freeze_blocks": 1})
    assert not any(
        n.startswith(("model.wte", "model.position", "model.blocks.0.")) for n in with_one_frozen
    )
    assert {
        "model.blocks.1.attn.c_attn.weight",
        "model.norm_f.weight",
        "model.lm_head.weight",
    } <= with_one_frozen

    lora = trainable({"method": "lora", "lora": {"targets": ["*.attn.c_proj"]}})
    assert lora == {"model.lm_head.weight", "model.lm_head.bias"} | {
        f"model.blocks.{i}.attn.c_proj.lora_{m}" for i in (0, 1) for m in "AB"
    }
    with pytest.raises(ValueError, match="freeze_blocks=3 exceeds the model's n_layer=2"):
        trainable({"freeze_blocks": 3})


def test_classification_learns_a_keyword_task(pretrained_ckpt, tiny_data_dir, tmp_path):
    """Which colour word hides among other words: easy, but only when reading the text.

    Easy enough that the model has learnt it well before the last step on any CPU: with 8
    words around the colour and lr 1e-2, the step at which learning set in varied so much
    between CPUs (and seeds) that the accuracy ended anywhere from the majority class's to 0.8.
    """
    filler = words(300)
    colours = ["red", "green", "blue"]
    generator = torch.Generator().manual_seed(0)
    records = []
    for i in range(240):
        label = colours[i % 4 % 3]  # uneven classes: red is the majority
        picks = [filler[int(j)] for j in torch.randint(0, len(filler), (2,), generator=generator)]
        picks.insert(int(torch.randint(0, 3, (1,), generator=generator)), label)
        records.append({"sentence": " ".join(picks), "colour": label})
    data = write_jsonl(tmp_path / "colours.jsonl", records)
    cfg = finetune_config(
        tmp_path,
        tiny_data_dir,
        "classify",
        f"init_from={pretrained_ckpt}",
        "finetune_data.source=jsonl",
        f"finetune_data.paths=[{data}]",
        "finetune_data.text_field=sentence",
        "finetune_data.label_field=colour",
        "finetune_data.num_classes=null",
        "finetune_data.loader.batch_size=16",
        "optimizer.lr=3e-3",
        "scheduler.warmup_steps=5",
        "trainer.max_steps=120",
        "trainer.val_check_interval=60",
    )
    results = train(cfg)
    assert results["val_majority_acc"] < 0.6
    assert results["val_acc"] > results["val_majority_acc"] + 0.3

    checkpoint = tmp_path / "checkpoints" / "last.ckpt"
    assert LitClassifier.load_from_checkpoint(checkpoint).labels == ["blue", "green", "red"]
    with pytest.raises(ValueError, match="is a classifier"):
        load_model(checkpoint)


# ----------------------------------------------------------------------------- built-in tasks


@pytest.mark.parametrize(
    ("experiment", "extra", "outputs"),
    [("sft", ["model.block_size=128"], 512), ("classify", [], 6)],  # tokens, classes
)
def test_experiments_run_from_scratch_with_a_warning(
    tiny_data_dir, tmp_path, caplog, experiment, extra, outputs
):
    """Without init_from the built-in tasks still run (e.g. for a config sweep), with a
    warning; the tokenizer then comes from the prepared dataset in corpus.dir."""
    cfg = finetune_config(tmp_path, tiny_data_dir, experiment, "debug=fast_dev_run", *extra)
    with caplog.at_level(logging.WARNING):
        results = train(cfg)
    # A freshly initialised model guesses about uniformly: a mean loss near ln(outputs).
    assert results["step"] == 1 and abs(results["val_loss"] - math.log(outputs)) < 0.1
    assert "init_from is null" in caplog.text


def test_docstring_records_explain_the_corpus_and_the_package_task_is_balanced_enough():
    records = builtin_docstring_records()
    corpus = builtin_corpus()
    texts = [text for _, _, text in records]
    assert list(dict.fromkeys(texts)) == corpus[: len(set(texts))]  # the corpus, topics aside
    assert all(name == module or name.startswith(module + ".") for module, name, _ in records)

    examples = package_examples(num_classes=5)
    counts = Counter(label for _, label in examples)
    assert len(counts) == 5
    assert len({text for text, _ in examples}) == len(examples)  # one package per text
    assert max(counts.values()) / len(examples) < 0.3  # a majority-class guess is weak


@pytest.mark.parametrize(
    "option", ["compile=true", "activation_checkpointing=true", "global_batch_tokens=4096"]
)
def test_pretraining_speed_options_are_refused_for_finetuning(tiny_data_dir, tmp_path, option):
    cfg = finetune_config(tmp_path, tiny_data_dir, "classify", "debug=fast_dev_run", option)
    with pytest.raises(ValueError, match="apply to pretraining"):
        train(cfg)


def test_resume_with_other_finetune_settings_is_refused(tiny_data_dir, tmp_path):
    """The settings decide which weights train, so the saved optimizer state would not fit."""
    first = finetune_config(tmp_path / "a", tiny_data_dir, "classify", *SHORT_CLASSIFY)
    train(first)
    checkpoint = tmp_path / "a" / "checkpoints" / "last.ckpt"
    again = finetune_config(
        tmp_path / "b",
        tiny_data_dir,
        "classify",
        *SHORT_CLASSIFY,
        "trainer.max_steps=4",
        "finetune.freeze_blocks=1",
        f"ckpt_path={checkpoint}",
    )
    with pytest.raises(ValueError, match=r"finetune=\{.*'freeze_blocks': 0.*this run has"):
        train(again)


def test_a_classifier_counts_the_flops_of_its_own_head():
    lit = LitClassifier(FT_GPT, labels=["a", "b", "c"])
    lm = GPT(GPTConfig(**FT_GPT))
    head_difference = 3 * 2 * FT_GPT["n_embd"] * (FT_GPT["vocab_size"] - 3)
    assert lm.flops_per_token() - lit.model.flops_per_token() == head_difference
