"""A kill at any point of save_checkpoint leaves a checkpoint that verifies against its sidecar.

The kill is simulated in-process by making the k-th ``os.replace`` raise (a real SIGKILL lands
at a random moment; tests/test_train.py and tests/test_faults_slurm.py cover that path). This
enumerates every rename of a save deterministically instead.
"""
import os

import pytest

from conftest import require_fairseq


class Killed(BaseException):
    pass


@pytest.mark.parametrize("kill_at", [1, 2, 3])
def test_every_kill_point_leaves_a_verifiable_checkpoint(tmp_path, monkeypatch, kill_at):
    require_fairseq()
    import torch

    from fairseq_ext.checkpoint import load_checkpoint, read_sidecar_hashes, save_checkpoint, verify_checkpoint

    path = tmp_path / "checkpoint_last.pt"
    old_digest = save_checkpoint({"model": {"w": torch.zeros(3)}, "extra_state": {"num_updates": 1}}, path)

    real_replace = os.replace
    calls = {"n": 0}

    def replace(src, dst):
        calls["n"] += 1
        if calls["n"] == kill_at:
            raise Killed()
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(Killed):
        save_checkpoint({"model": {"w": torch.ones(3)}, "extra_state": {"num_updates": 2}}, path)
    monkeypatch.setattr(os, "replace", real_replace)

    digest = verify_checkpoint(path)  # never "corrupt"
    state = load_checkpoint(path)
    updates = state["extra_state"]["num_updates"]
    assert updates in (1, 2)
    assert torch.equal(state["model"]["w"], torch.zeros(3) if updates == 1 else torch.ones(3))
    assert digest in read_sidecar_hashes(path)
    assert (digest == old_digest) == (updates == 1)

    # The next save after the interrupted one is clean again: one hash, the new file's.
    final = save_checkpoint({"model": {"w": torch.full((3,), 2.0)}, "extra_state": {"num_updates": 3}}, path)
    assert read_sidecar_hashes(path) == [final] == [verify_checkpoint(path)]


def test_sidecar_mismatch_is_still_refused(tmp_path):
    require_fairseq()
    import torch

    from launcher.contract.errors import BtmError
    from fairseq_ext.checkpoint import save_checkpoint, verify_checkpoint

    path = tmp_path / "c.pt"
    save_checkpoint({"model": {"w": torch.zeros(3)}}, path)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(BtmError, match="does not match its sidecar"):
        verify_checkpoint(path)
