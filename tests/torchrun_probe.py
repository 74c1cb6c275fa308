"""``python -m launcher`` for torchrun in tests, with every checkpoint save recorded.

The real save runs; the wrapper only appends ``{rank, file, update}`` to $BTM_PROBE_SAVES, so a
test can tell which ranks wrote checkpoints (the files cannot: two ranks would write the same
paths). Run as ``torchrun ... tests/torchrun_probe.py train ...``.
"""
import json
import os
import sys

from fairseq_ext import checkpoint

_real_save = checkpoint.save_checkpoint


def _recording_save(state, path):
    row = {"rank": int(os.environ.get("RANK", 0)), "file": os.path.basename(str(path)),
           "update": state["extra_state"]["num_updates"]}
    with open(os.environ["BTM_PROBE_SAVES"], "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    return _real_save(state, path)


checkpoint.save_checkpoint = _recording_save

if __name__ == "__main__":
    from launcher.cli import main

    sys.exit(main(sys.argv[1:]))
