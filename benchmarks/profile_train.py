"""Where a training update's time goes: btm's trainer vs the plain loop of train_speed.py.

Profiles ``--updates`` updates of each (after ``--skip`` unprofiled ones: the first updates
allocate and warm caches) with ``torch.profiler`` and prints, per contender, the share of the
update time spent in the top operators (self CPU time) and in Python outside any operator, as
percentages: on a shared machine absolute times are noise, shares much less so. CPU only, one
thread (OMP_NUM_THREADS=1 is set here before torch loads).

    python benchmarks/profile_train.py --data DATA --domain python_code --preset tiny --updates 40
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[1]


def profile(fn, skip: int, updates: int, top: int) -> None:
    """Profile updates ``skip + 1`` to ``skip + updates`` of ``fn``'s loop; one profiler step
    per optimizer step, so each window holds one whole update (data, forward, backward, step,
    logging) and nothing of setup or teardown."""
    from torch.optim.optimizer import register_optimizer_step_post_hook
    from torch.profiler import ProfilerActivity, profile as torch_profile, schedule

    with torch_profile(activities=[ProfilerActivity.CPU],
                       schedule=schedule(wait=skip, warmup=1, active=updates)) as prof:
        hook = register_optimizer_step_post_hook(lambda *_: prof.step())
        try:
            fn()
        finally:
            hook.remove()
    events = prof.key_averages()
    steps = [e for e in events if e.key.startswith("ProfilerStep")]
    total_us = sum(e.cpu_time_total for e in steps)
    python_us = sum(e.self_cpu_time_total for e in steps)
    print(f"  {sum(e.count for e in steps)} updates profiled; outside any operator (Python): "
          f"{python_us / total_us:.1%}")
    ops = [e for e in events if not e.key.startswith("ProfilerStep") and e.self_cpu_time_total > 0]
    for e in sorted(ops, key=lambda e: -e.self_cpu_time_total)[:top]:
        print(f"  {e.self_cpu_time_total / total_us:6.1%}  {e.count:6d} calls  {e.key}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True)
    ap.add_argument("--domain", default="python_code")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--sequences", type=int, default=8)
    ap.add_argument("--updates", type=int, default=40)
    ap.add_argument("--skip", type=int, default=5)
    ap.add_argument("--top", type=int, default=15)
    a = ap.parse_args()
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "benchmarks"))
    import train_speed
    from fairseq_ext.train import TrainSpec, train_lm
    from launcher.contract.presets import get_preset

    p = get_preset(a.preset)
    print(f"load average at start: {train_speed.load_average()}")

    def btm():
        with tempfile.TemporaryDirectory() as tmp:
            train_lm(TrainSpec(data_dir=a.data, domains=[a.domain], save_dir=tmp, preset=a.preset,
                               max_updates=a.skip + a.updates + 2, save_interval_updates=10**9, device="cpu",
                               tokens_per_batch=a.sequences * p.tokens_per_sample, log_interval=10,
                               valid_max_tokens=p.tokens_per_sample, compile=False))

    def plain():
        train_speed.run_plain(argparse.Namespace(data=a.data, domain=a.domain, preset=a.preset, device="cpu",
                                                 sequences=a.sequences, updates=a.skip + a.updates + 2, skip=1))

    for name, fn in (("btm", btm), ("plain", plain)):
        print(f"{name}: {a.updates} updates of {a.sequences} x {p.tokens_per_sample} tokens, preset {a.preset}")
        profile(fn, a.skip, a.updates, a.top)
    print(f"load average at end: {train_speed.load_average()}")


if __name__ == "__main__":
    main()
