"""The config tree: groups are single choices, a schema rejects unknown keys at composition, every
old override names its replacement, and the configs compose to the values they had before the
split (tests/fixtures/configs_before_split.json, recorded from the configs of commit 11e8521).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from hydra._internal.utils import _locate
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf, open_dict

from gptlab.cli import CONFIG_DIR
from gptlab.cli.overrides import new_override, override_error
from gptlab.config_schema import ModelSchema, TrainSchema, register_schemas
from gptlab.finetune.base import FinetuneConfig
from gptlab.model import GPTConfig
from gptlab.scaling.plan import ScalingConfig
from gptlab.training.optim import OptimizerConfig, SchedulerConfig
from tests.kit import run_script

BEFORE = json.loads((Path(__file__).parent / "fixtures" / "configs_before_split.json").read_text())
FINETUNING = {"train/experiment_sft", "train/experiment_classify"}
# Sections built into these dataclasses: a key the new config adds must hold the dataclass's own
# default, the value the run used when the old config left the key out.
DATACLASSES = {
    "model": GPTConfig,
    "optimizer": OptimizerConfig,
    "scheduler": SchedulerConfig,
    "finetune": FinetuneConfig,
    "scaling": ScalingConfig,
}


# Keys added since the configs were recorded, with their value in every config.
ADDED_KEYS = {
    "trainer.enable_model_summary": False,  # gptlab-train prints its own summary
    # Checkpoints at listed steps, none listed by default (WSD branch points).
    "callbacks.step_checkpoints._target_": (
        "gptlab.training.callbacks.step_checkpoints.CheckpointAtSteps"
    ),
    "callbacks.step_checkpoints.dirpath": "OUTPUT_DIR/checkpoints",
    "callbacks.step_checkpoints.steps": [],
}
# Classes the redesign moved to their one home (issue 14): the configs name them there now.
MOVED_CLASSES = {
    "gptlab.data.classify.": "gptlab.finetune.classify.",
    "gptlab.data.sft.": "gptlab.finetune.sft.",
    "gptlab.training.callbacks.": "gptlab.training.callbacks.samples.",
    "gptlab.training.checkpoint_io.": "gptlab.training.checkpoint.",
    "gptlab.training.diagnostics.": "gptlab.training.callbacks.diagnostics.",
    "gptlab.training.finetune.": "gptlab.training.callbacks.samples.",
    "gptlab.training.guards.": "gptlab.training.callbacks.guards.",
    "gptlab.training.hparams.": "gptlab.training.callbacks.hparams.",
}


def moved_target(target: str) -> str:
    module, _, name = target.rpartition(".")
    if name == "ThroughputCallback":
        return f"gptlab.training.callbacks.throughput.{name}"
    new = MOVED_CLASSES.get(module + ".")
    return new + name if new else target


def with_moved_targets(tree: Any) -> Any:
    """`tree` with every `_target_` at its class's new home."""
    if isinstance(tree, dict):
        return {
            k: moved_target(v) if k == "_target_" else with_moved_targets(v)
            for k, v in tree.items()
        }
    return [with_moved_targets(v) for v in tree] if isinstance(tree, list) else tree


def targets(tree: Any) -> list[str]:
    if isinstance(tree, dict):
        return [t for k, v in tree.items() for t in ([v] if k == "_target_" else targets(v))]
    return [t for v in tree for t in targets(v)] if isinstance(tree, list) else []


def compose_resolved(root: str, overrides: list[str]) -> dict[str, Any]:
    register_schemas()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name=root, overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = "OUTPUT_DIR"
    return OmegaConf.to_container(cfg, resolve=True)


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        return {
            k: v for key, sub in tree.items() for k, v in flatten(sub, f"{prefix}{key}.").items()
        }
    return {prefix.rstrip("."): tree}


def new_path(old: str, case: str) -> str:
    """Where an old config path lives now (the same map as README's "old to new" table)."""
    if not old.startswith("data.") or old.startswith("data.loader") and case not in FINETUNING:
        return old
    if case in FINETUNING and old != "data.dir":
        return "finetune_data." + old.removeprefix("data.")
    return "corpus." + old.removeprefix("data.")


def dataclass_default(path: str) -> Any:
    section, key = path.split(".", 1)
    cls = DATACLASSES[section]
    for part in key.split(".")[:-1]:  # finetune.lora.rank
        cls = next(f for f in dataclasses.fields(cls) if f.name == part).default_factory
    field = next(f for f in dataclasses.fields(cls) if f.name == key.split(".")[-1])
    default = field.default_factory() if field.default is dataclasses.MISSING else field.default
    return list(default) if isinstance(default, tuple) else default


@pytest.mark.parametrize("case", sorted(BEFORE["configs"]))
def test_the_configs_compose_to_the_values_they_had_before_the_split(case):
    old = BEFORE["configs"][case]
    root = case.split("/")[0]
    finetuning = case in FINETUNING
    overrides = [new_override(o, finetuning) or o for o in old["overrides"]]
    overrides = [o.replace("model/attention", "ablation/attention") if "ablation" in case else o
                 for o in overrides]  # fmt: skip
    before = {new_path(k, case): v for k, v in flatten(with_moved_targets(old["values"])).items()}
    composed = compose_resolved(root, overrides)
    for target in targets(composed):
        assert _locate(target) is not None, (case, target)  # the class is where configs say
    after = flatten(composed)
    if root == "prepare":
        before = {k: v for k, v in before.items() if not k.startswith("corpus.loader")}
    for path, value in before.items():
        assert after.get(path, "absent") == value, (case, path)
    for path in after.keys() - before.keys():
        section = path.split(".")[0]
        if section in DATACLASSES and after[path] is not None:
            assert after[path] == dataclass_default(path), (case, path)
        elif finetuning and section == "corpus":  # names only the tokenizer's folder there
            continue
        elif path in ADDED_KEYS:
            assert after[path] == ADDED_KEYS[path], (case, path)
        else:  # a section this run does not have: finetune, scaling, finetune_data, data
            assert after[path] is None or path == "model.vocab_size", (case, path)


def test_gqa_and_qk_norm_combine_and_the_attention_group_picks_the_backend_only():
    model = compose_resolved(
        "train", ["model.n_kv_heads=2", "model.qk_norm=true", "model/attention=eager"]
    )["model"]
    assert (model["n_kv_heads"], model["qk_norm"], model["attention"]) == (2, True, "eager")
    assert model["sliding_window"] is None
    GPTConfig.from_dict({**model, "vocab_size": 64})  # a valid model


def test_presets_state_only_what_differs_from_the_dataclass_defaults():
    """Every value a preset file sets differs from the schema default (the one home)."""
    defaults = OmegaConf.to_container(OmegaConf.structured(ModelSchema))
    for preset in ("nano", "gpt2_124m", "llama_style"):
        values = OmegaConf.load(Path(CONFIG_DIR) / "model" / f"{preset}.yaml")
        for key, value in values.items():
            if key != "defaults":
                assert value != defaults[key], (preset, key)


def test_the_model_schema_has_gptconfigs_fields_and_defaults():
    schema = OmegaConf.to_container(OmegaConf.structured(ModelSchema))
    config = dataclasses.asdict(GPTConfig())
    assert list(schema) == list(config)
    assert {k: v for k, v in schema.items() if k != "vocab_size"} == {
        k: v for k, v in config.items() if k != "vocab_size"
    }
    assert schema["vocab_size"] is None  # from the prepared data


def test_an_unknown_key_in_a_config_file_fails_at_composition(tmp_path):
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "typo.yaml").write_text("# @package _global_\nmodel:\n  n_layr: 3\n")
    overrides = [f"hydra.searchpath=[file://{tmp_path}]", "experiment=typo"]
    register_schemas()
    with (
        initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"),
        pytest.raises(ConfigCompositionException) as caught,
    ):
        compose("train", overrides)
    assert "In 'experiment/typo'" in str(caught.value)
    assert "Key 'n_layr' not in 'ModelSchema'" in str(caught.value)


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (
            ["+model.n_layr=3"],
            "model.n_layr is not a config key; the keys of model are: vocab_size",
        ),
        (["finetune.lora.rnk=2"], "the keys of finetune.lora are: rank, alpha, dropout, targets"),
        (["sed=1"], "sed is not a config key; the keys of the root config are: task_name, seed"),
        (["model/attention=gqa"], "model/attention=gqa is now model.n_kv_heads=2"),
        (["model/attention=qk_norm"], "model/attention=qk_norm is now model.qk_norm=true"),
        (["data=builtin_site"], "data=builtin_site is now corpus=builtin_site"),
        (["data.dir=/d"], "data.dir=/d is now corpus.dir=/d"),
        (["experiment=sft", "data.source=jsonl"], "is now finetune_data.source=jsonl"),
        (["experiment=sft", "data.loader.packing=true"], "now finetune_data.loader.packing=true"),
    ],
)
def test_a_bad_override_names_what_to_write_instead(args, error):
    assert error in override_error(args, TrainSchema)


def test_good_overrides_pass():
    args = ["model.n_kv_heads=2", "data.loader.batch_size=4", "hydra.run.dir=x", "+trainer.x=1"]
    groups = ["model/attention=eager", "corpus=hf", "debug=fast_dev_run", "+experiment=sft"]
    assert override_error([*args, *groups, "-m"], TrainSchema) is None


def test_the_readme_table_lists_each_moved_override():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    for old in ("model/attention=gqa", "data=<corpus>", "data.<key>", "data.dir"):
        assert f"`{old}`" in readme


@pytest.mark.slow
def test_gptlab_train_stops_an_old_override_with_one_line(tmp_path):
    result = run_script("gptlab-train", "model/attention=mqa", cwd=tmp_path, check=False)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "gptlab-train: error: model/attention=mqa is now model.n_kv_heads=1 (the attention group "
        "picks the backend only: eager, sdpa; in experiment=attention_ablation: "
        'ablation/attention=mqa) (README: "Config overrides: old to new")'
    ]
