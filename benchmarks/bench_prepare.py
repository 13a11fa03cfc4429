"""How fast does gptlab-prepare tokenize, and in how much memory? Against raw `tokenizers`.

For each corpus size (generated here: text files of blank-line separated paragraphs of
Zipf-distributed pseudo-words, a few KB each, like web documents) and each `num_proc`:
  (a) raw: `tokenizers`' ``encode_batch_fast`` on the same paragraphs, read file by file,
      with as many threads as (b) has worker processes; nothing is written;
  (b) prepare: ``gptlab-prepare corpus=text_files corpus.document_split=paragraph`` with a given
      tokenizer (trained once, before timing), writing shards and manifest.
Each run is a fresh process; the table gives MB/s of text, the ratio (b)/(a), and the peak
resident memory of (b): of its largest process (getrusage of the children) and of the whole
process tree (sum over processes, polled from /proc every 0.1 s). Then, from the measured
MB/s per core of the largest run, the time FineWeb-Edu's 10BT sample (~45 GB of text) would
take on 16 and 64 cores, if the rate per core held.

    python benchmarks/bench_prepare.py                       # 20, 80, 320 MB; num_proc 1, 2
    python benchmarks/bench_prepare.py --sizes 5 --num-proc 1 2 --out /tmp/prepare.md
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

FINEWEB_EDU_10BT_MB = 45_000
FILE_MB = 4  # size of each generated file


def write_corpus(folder: Path, megabytes: float, seed: int = 0) -> str:
    """Text files of about `FILE_MB` MB (the last smaller) totalling `megabytes` MB under
    `folder`: paragraphs of 50-1500 pseudo-words drawn from a Zipf law over 30,000 words
    made of syllables, so BPE finds structure as in real text. Returns a glob over them."""
    rng = np.random.default_rng(seed)
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + ["the", "and", "ing"]
    lengths = rng.integers(1, 4, 30_000)
    words = np.array(["".join(rng.choice(syllables, n)) for n in lengths])
    zipf = np.cumsum(1.0 / np.arange(1, len(words) + 1))
    zipf /= zipf[-1]
    folder.mkdir(parents=True, exist_ok=True)
    target = int(megabytes * 1e6)
    written, index = 0, 0
    while written < target:
        paragraphs, size = [], 0
        while size < min(FILE_MB * 1e6, target - written):
            draw = words[np.searchsorted(zipf, rng.random(rng.integers(50, 1500)))]
            paragraph = " ".join(draw).capitalize() + "."
            paragraphs.append(paragraph)
            size += len(paragraph) + 2
        text = "\n\n".join(paragraphs) + "\n"
        (folder / f"part_{index:05d}.txt").write_text(text, encoding="utf-8")
        written += len(text.encode("utf-8"))
        index += 1
    return str(folder / "*.txt")


def prepare_command(pattern: str, out: Path, hydra_dir: Path, *overrides: str) -> list[str]:
    """gptlab-prepare on the paragraphs of the files `pattern` matches, into `out`."""
    return [
        sys.executable,
        "-c",
        "from gptlab.cli.prepare import main; main()",
        "corpus=text_files",
        f"corpus.paths=[{pattern}]",
        "corpus.document_split=paragraph",
        f"corpus.dir={out}",
        f"hydra.run.dir={hydra_dir}",
        *overrides,
    ]


def raw_encode(pattern: str, tokenizer_path: str) -> None:
    """(a): read each file, split it into paragraphs as prepare does, encode them."""
    import glob

    from tokenizers import Tokenizer

    from gptlab.data.clean import DocumentSplit

    tokenizer = Tokenizer.from_file(tokenizer_path)
    split = DocumentSplit("paragraph")
    for path in sorted(glob.glob(pattern)):
        docs = list(split.split([Path(path).read_text(encoding="utf-8")]))
        tokenizer.encode_batch_fast(docs, add_special_tokens=False)


def measure(command: list[str], env: dict[str, str]) -> dict[str, float]:
    """Run `command` in a fresh process (this script with --measure), and return its wall
    seconds, the peak RSS of its largest process and of its whole process tree (MB)."""
    probe = [sys.executable, __file__, "--measure", "--", *command]
    done = subprocess.run(probe, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _run_and_watch(command: list[str]) -> None:
    """--measure: run `command`, poll its process tree's memory, print the numbers as JSON."""
    start = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    tree_peak = 0
    while child.poll() is None:
        tree_peak = max(tree_peak, _tree_rss(child.pid))
        time.sleep(0.1)
    seconds = time.perf_counter() - start
    if child.returncode != 0:
        sys.exit(child.returncode)
    largest = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"seconds": seconds, "largest_mb": largest, "tree_mb": tree_peak / 2**20}))


def _tree_rss(root: int) -> int:
    """Bytes resident in process `root` and all its descendants, from /proc."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    tree, total = {root}, 0
    for pid in sorted(parents):  # children have larger pids, almost always
        if parents[pid] in tree:
            tree.add(pid)
    for pid in tree:
        try:
            rss_pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
        except OSError:
            continue
        total += rss_pages * os.sysconf("SC_PAGE_SIZE")
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[20, 80, 320], help="MB")
    parser.add_argument("--num-proc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temp folder")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        tokenizer = _train_tokenizer(work, args.vocab_size)
        rows = []
        for size in args.sizes:
            pattern = write_corpus(work / f"corpus_{size:g}MB", size, seed=1)
            megabytes = sum(p.stat().st_size for p in (work / f"corpus_{size:g}MB").iterdir()) / 1e6
            for num_proc in args.num_proc:
                rows.append(_compare(work, pattern, megabytes, num_proc, tokenizer))
                print(_format_row(rows[-1]), flush=True)
    report = _report(rows, args)
    print("\n" + report)
    if args.out:
        args.out.write_text(report)


def _train_tokenizer(work: Path, vocab_size: int) -> str:
    """A BPE tokenizer trained on 5 MB of the generated text (the same for every run)."""
    from gptlab.data.clean import DocumentSplit
    from gptlab.data.tokenizer import save_tokenizer, train_tokenizer

    pattern = write_corpus(work / "tokenizer_corpus", 5, seed=0)
    texts = [Path(p).read_text() for p in sorted(Path(pattern).parent.glob("*.txt"))]
    docs = DocumentSplit("paragraph").split(texts)
    path = work / "tokenizer.json"
    save_tokenizer(train_tokenizer(docs, vocab_size), path)
    return str(path)


def _compare(work: Path, pattern: str, megabytes: float, num_proc: int, tokenizer: str) -> dict:
    env = os.environ | {"RAYON_NUM_THREADS": str(num_proc)}
    if num_proc == 1:  # prepare with one process encodes in-process: keep it to one thread
        env["TOKENIZERS_PARALLELISM"] = "false"
    raw = measure([sys.executable, __file__, "--raw", pattern, tokenizer], env)
    out = work / f"prepared_{num_proc}"
    command = prepare_command(pattern, out, work / "hydra", f"corpus.num_proc={num_proc}")
    prepare = measure([*command, f"tokenizer.path={tokenizer}", "force=true"], env)
    return {"mb": megabytes, "num_proc": num_proc, "raw": raw, "prepare": prepare}


def _format_row(row: dict) -> str:
    raw_rate = row["mb"] / row["raw"]["seconds"]
    rate = row["mb"] / row["prepare"]["seconds"]
    return (
        f"| {row['mb']:8.1f} | {row['num_proc']:8d} | {raw_rate:9.2f} | {rate:13.2f} | "
        f"{rate / raw_rate:10.2f} | {row['prepare']['largest_mb']:17.0f} | "
        f"{row['prepare']['tree_mb']:14.0f} |"
    )


def _report(rows: list[dict], args: argparse.Namespace) -> str:
    header = (
        "| text MB  | num_proc | raw MB/s  | prepare MB/s  | prepare/raw | peak RSS, largest | "
        "peak RSS, tree |\n"
        "|---------:|---------:|----------:|--------------:|------------:|------------------:|"
        "---------------:|"
    )
    largest = max(rows, key=lambda r: (r["mb"], r["num_proc"]))
    per_core = largest["mb"] / largest["prepare"]["seconds"] / largest["num_proc"]
    projection = ", ".join(
        f"{cores} cores: {FINEWEB_EDU_10BT_MB / (per_core * cores) / 60:.0f} min"
        for cores in (16, 64)
    )
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    return "\n".join(
        [
            f"gptlab-prepare against raw tokenizers, BPE vocab {args.vocab_size}, "
            f"{datetime.date.today()}, {machine}, Python {platform.python_version()}",
            "(MB of UTF-8 text per second, wall clock, each run a fresh process; peak RSS in MB)",
            "",
            header,
            *(_format_row(row) for row in rows),
            "",
            f"Measured {per_core:.2f} MB/s per core (largest run). FineWeb-Edu 10BT "
            f"(~{FINEWEB_EDU_10BT_MB / 1000:.0f} GB of text) at that rate per core: {projection} "
            "(assumes linear scaling in cores and the same text statistics).",
        ]
    )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--measure"]:
        _run_and_watch(sys.argv[3:])
    elif sys.argv[1:2] == ["--raw"]:
        raw_encode(sys.argv[2], sys.argv[3])
    else:
        main()
