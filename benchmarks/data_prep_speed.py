"""Throughput of sharded data preparation and c-BTM assignment, per core, at 1, 2 and 4 tasks.

Builds the demo corpus (``launcher.demo_corpus``, offline), trains the tokenizer once
(``data_prep.plan_data``) and fits a c-BTM model once, then for each task count runs that many
processes at the same time, each one task of the array (one core each):

- binarization: ``data_prep.binarize_task(DATA, t, n)``, shards of ``--shard-mb``;
- assignment: ``cluster.assign_shard(MODEL, CORPUS, OUT, t, n)``.

Prints, per step and task count: wall time, tokens/s in all, the CPU seconds of all tasks
(imports included) and tokens per CPU-second (= tokens/s per core, unaffected by other load
on the machine), and the largest peak RSS of a task (VmHWM of the task process). Tokens are
the prepared tokens of the corpus (eos included), so both steps are in the same unit.

``--long-mb N`` also measures one document of N MB on one line (no newline inside): the peak
RSS of the task that binarizes it, and of encoding it in one call as data prep did before
documents were encoded in pieces. Peak RSS is VmHWM (Linux).

    python benchmarks/data_prep_speed.py                       # ~28 MB corpus, 1/2/4 tasks
    python benchmarks/data_prep_speed.py --size 1000000 --long-mb 50
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _task(step: str, args: tuple, queue) -> None:
    if step == "binarize":
        from fairseq_ext.data_prep import binarize_task

        binarize_task(*args)
    else:
        from fairseq_ext.cluster import AssignSettings, assign_shard

        model, corpus, out, t, n = args
        assign_shard(model, corpus, out, t, n, AssignSettings())
    usage = resource.getrusage(resource.RUSAGE_SELF)
    queue.put((peak_rss_mb(), usage.ru_utime + usage.ru_stime))


def peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM: unlike ru_maxrss it does not start from the parent's
    peak, which a spawned child inherits across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_tasks(step: str, task_args: list[tuple]) -> tuple[float, float, float]:
    """Run the tasks at once, one process each; (wall seconds, largest peak RSS in MB, CPU
    seconds of all tasks, imports included)."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_task, args=(step, a, queue)) for a in task_args]
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    got = [queue.get() for _ in procs]
    for p in procs:
        p.join()
        if p.exitcode:
            raise SystemExit(f"{step} task failed (exit {p.exitcode})")
    return time.perf_counter() - t0, max(r for r, _ in got), sum(c for _, c in got)


def long_document(work: Path, mb: int) -> None:
    """Peak RSS of binarizing one N-MB single-line document, in pieces and in one call."""
    from fairseq_ext import data_prep

    corpus = work / "long"
    words = (Path(sys.executable).resolve().parent.parent / "lib").glob("python3*/textwrap.py")
    text = next(words).read_text().replace("\n", " ")
    doc = (text * (mb * 2**20 // len(text) + 1))[: mb * 2**20]
    for split in ("train", "valid", "test"):
        (corpus / "long").mkdir(parents=True, exist_ok=True)
        with open(corpus / "long" / f"{split}.jsonl", "w") as f:
            f.write(json.dumps({"text": doc if split == "train" else "a short one"}) + "\n")
    out = work / "long_data"
    data_prep.plan_data(corpus, out, vocab_size=2000, sample_chars=200_000)
    wall, rss, cpu = run_tasks("binarize", [(str(out), 0, 1)])
    print(f"one {mb} MB single-line document: binarize task peak RSS {rss:.0f} MB, {wall:.1f} s, {cpu:.1f} CPU s")
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=_whole_encode, args=(str(out), str(corpus / "long" / "train.jsonl"), queue))
    p.start()
    print(f"  the same document encoded in one call (before pieces): peak RSS {queue.get():.0f} MB")
    p.join()


def _whole_encode(out: str, path: str, queue) -> None:
    import numpy as np
    import sentencepiece as spm
    import torch

    from fairseq_ext.spm_tokenizer import encode_with
    from launcher.contract.corpus import iter_documents

    sp = spm.SentencePieceProcessor(model_file=f"{out}/spm.model")
    for doc in iter_documents(path):
        torch.from_numpy(np.asarray(encode_with(sp, doc), dtype=np.int64))
    queue.put(peak_rss_mb())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=4_000_000, help="characters per demo domain")
    ap.add_argument("--shard-mb", type=float, default=1.0)
    ap.add_argument("--tasks", default="1,2,4")
    ap.add_argument("--k", type=int, default=8, help="clusters of the assignment benchmark")
    ap.add_argument("--long-mb", type=int, default=0, help="also measure one single-line document of this size")
    args = ap.parse_args()

    from fairseq_ext import data_prep
    from fairseq_ext.cluster import FitSettings
    from fairseq_ext.cluster.pipeline import fit_model_dir
    from launcher.demo_corpus import build_demo_corpus

    print(f"machine: {platform.node()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}")
    work = Path(tempfile.mkdtemp(prefix="btm_prep_speed_"))
    try:
        corpus = work / "corpus"
        build_demo_corpus(corpus, size=args.size)
        mb = sum(p.stat().st_size for p in corpus.rglob("*.jsonl")) / 2**20
        data = work / "data"
        shard_bytes = int(args.shard_mb * 2**20)
        plan = data_prep.plan_data(corpus, data, vocab_size=8000, shard_bytes=shard_bytes)
        print(f"corpus: {mb:.1f} MB, {plan['shards']} shards of {args.shard_mb} MB")
        fit_model_dir(corpus, work / "model", FitSettings(k=args.k, sample_size=20_000))
        planned = work / "planned"  # the planned data directory, copied afresh for every run
        shutil.copytree(data, planned)
        tokens = None
        header = (f"{'step':10} {'tasks':>5} {'wall s':>7} {'tokens/s':>10} {'CPU s':>7} {'tokens/CPU-s':>13} "
                  f"{'peak RSS MB':>12}")
        rows = []
        for n in [int(x) for x in args.tasks.split(",")]:
            shutil.rmtree(data)
            shutil.copytree(planned, data)
            result = run_tasks("binarize", [(str(data), t, n) for t in range(n)])
            if tokens is None:
                manifest = data_prep.merge_data(data)
                tokens = sum(v["tokens"] for v in manifest["datasets"].values())
                print(f"tokens: {tokens}\n{header}")
            rows.append(("binarize", n, *result))
            out = work / f"assign{n}"
            rows.append(("assign", n, *run_tasks("assign", [(str(work / "model"), str(corpus), str(out), t, n)
                                                            for t in range(n)])))
            for step, tasks, wall, rss, cpu in rows[-2:]:
                print(f"{step:10} {tasks:5d} {wall:7.1f} {tokens / wall:10.0f} {cpu:7.1f} {tokens / cpu:13.0f} "
                      f"{rss:12.0f}", flush=True)
        if args.long_mb:
            long_document(work, args.long_mb)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
