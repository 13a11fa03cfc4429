"""The console scripts, run as a user runs them, and the README commands that point at them."""

from __future__ import annotations

import logging
import re
import shutil
import sys
import tomllib
from pathlib import Path

from tests.kit import REPO, TINY_MODEL, run_script, small_english_documents


def test_prepare_train_generate_from_the_command_line(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, text in enumerate(small_english_documents(60)):
        (corpus / f"doc{i:03d}.txt").write_text(text, encoding="utf-8")
    data = ["corpus=text_files", f"corpus.paths=[{corpus}/*.txt]", "tokenizer.vocab_size=400"]

    out = run_script("gptlab-prepare", *data, cwd=tmp_path).stdout
    assert "unigram entropy" in out
    assert (tmp_path / "data" / "text_files-bpe400" / "manifest.json").is_file()
    assert "already prepared" in run_script("gptlab-prepare", *data, cwd=tmp_path).stdout

    train_args = [
        *data,
        *TINY_MODEL,
        "trainer.max_steps=4",
        "trainer.val_check_interval=2",
        "scheduler.warmup_steps=1",
        "trainer.enable_progress_bar=false",
    ]
    out = run_script("gptlab-train", *train_args, cwd=tmp_path).stdout
    assert "val loss" in out and "unigram entropy" in out
    runs = list((tmp_path / "logs" / "train" / "runs").iterdir())
    assert len(runs) == 1 and (runs[0] / "checkpoints" / "last.ckpt").is_file()
    assert (runs[0] / ".hydra" / "config.yaml").is_file()

    out = run_script("gptlab-generate", "prompt=The", "max_new_tokens=5", cwd=tmp_path).stdout
    assert out.startswith("The")


def readme_bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), flags=re.S)


def test_readme_starts_with_main_job_and_test_commands():
    main_job, tests = readme_bash_blocks()[:2]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    for script in ("gptlab-prepare", "gptlab-train", "gptlab-generate"):
        assert script in main_job and script in scripts
    assert "pytest" in tests
    # CI must run exactly the README's test command.
    assert tests.strip() in (REPO / ".ci" / "run").read_text()


def test_console_scripts_are_installed():
    for script in ("gptlab-prepare", "gptlab-train", "gptlab-generate"):
        assert shutil.which(script, path=str(Path(sys.executable).parent)), script


NOTICES = (
    "litlogger",  # Lightning's cloud-logger advertisement
    "LeafSpec",  # torch's _pytree deprecation, triggered inside Lightning
    "`IterableDataset` has `__len__`",
)


def test_train_console_shows_no_lightning_notices(tiny_data_dir, tmp_path):
    args = [
        *TINY_MODEL,
        f"corpus.dir={tiny_data_dir}",
        "debug=fast_dev_run",
        "callbacks.samples=null",
    ]
    proc = run_script("gptlab-train", *args, cwd=tmp_path)
    console = proc.stdout + proc.stderr
    assert "val loss" in console  # gptlab's own lines still print
    for notice in NOTICES:
        assert notice not in console


def test_quieting_the_notices_leaves_other_warnings_alone():
    import warnings

    from gptlab.training.console import quiet_known_notices

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_known_notices()
        for message, category in (
            ("Your `IterableDataset` has `__len__` defined. ...", UserWarning),
            ("some other problem", UserWarning),
            ("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning),
            ("another deprecation", FutureWarning),
        ):
            warnings.warn(message, category, stacklevel=1)
    assert [str(w.message) for w in caught] == ["some other problem", "another deprecation"]


def test_quieting_drops_dtensors_strided_gather_notice_only(caplog):
    from gptlab.training.console import quiet_known_notices

    dtensor_log = logging.getLogger("torch.distributed.tensor._redistribute")
    quiet_known_notices()
    with caplog.at_level(logging.WARNING, logger=dtensor_log.name):
        notice = "While redistributing from %s to %s, %d sequential %s operations will be ... %s"
        for reason in (
            "it is not possible to merge non-ascending order all_gather operations.",
            "To optimize, flatten mesh dimensions [...] so DTensor can use a single operation.",
        ):
            dtensor_log.warning(notice, "(_StridedShard, Shard)", "(R, R)", 2, "all_gather", reason)
    assert len(caplog.records) == 1 and "flatten mesh dimensions" in caplog.text
