"""TensorBoard's HParams dashboard gets each run's hyperparameters with its final metrics."""

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from gptlab.cli.train import train
from tests.kit import tiny_run


def hparams_plugin(events, tag):
    content = events.PluginTagToContent("hparams")[tag]
    return plugin_data_pb2.HParamsPluginData.FromString(content)


def test_final_metrics_and_hyperparameters_reach_the_hparams_dashboard(tiny_data_dir, tmp_path):
    overrides = [
        "data.loader.batch_size=8",
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        "scheduler.warmup_steps=1",
        "callbacks.samples=null",
        "callbacks.throughput=null",
        "optimizer.lr=0.002",
        "data.loader.val_windows=16",
        "callbacks.model_checkpoint=null",
    ]
    results = train(tiny_run(tiny_data_dir, tmp_path, *overrides))
    events = EventAccumulator(str(tmp_path / "tensorboard")).Reload()

    session = hparams_plugin(events, "_hparams_/session_start_info").session_start_info
    hparams = session.hparams
    assert hparams["model/n_layer"].number_value == 2
    assert hparams["optimizer/lr"].number_value == pytest.approx(0.002)
    assert hparams["data/batch_size"].number_value == 8
    assert hparams["trainer/max_steps"].number_value == 4
    assert hparams["tokenizer"].string_value == "bpe"
    assert hparams["dataset"].string_value == "builtin"

    experiment = hparams_plugin(events, "_hparams_/experiment").experiment
    names = {info.name.tag for info in experiment.metric_infos}
    assert names == {"loss/val", "loss/val_ppl", "loss/train"}  # the curves themselves
    curve = events.Scalars("loss/val")
    assert len(curve) == 2  # the two validations: no copy of the metric was added to it
    assert curve[-1].value == pytest.approx(results["val_loss"])
    assert not [tag for tag in events.Tags()["scalars"] if tag.startswith("hparams/")]
    assert "epoch" not in events.Tags()["scalars"]
