"""BTM through the CLI: seed on a balanced mix, branch an expert per domain, train each."""
import json

import pytest

from conftest import require_fairseq, run_btm

pytestmark = pytest.mark.fairseq

DOMAINS = ["bible", "code_python", "legal"]
COMMON = ["--tokens-per-batch", "256", "--valid-max-tokens", "2048", "--save-interval-updates", "10"]


@pytest.fixture(scope="module")
def data_dir(small_corpus, tmp_path_factory):
    require_fairseq()
    from elm_testdata import build_data
    return build_data(small_corpus, tmp_path_factory.mktemp("data"), DOMAINS)


@pytest.mark.slow
def test_seed_branch_train_experts_beat_seed_on_their_domain(data_dir, tmp_path):
    import torch
    from fairseq_ext.checkpoint import load_checkpoint, load_model
    from fairseq_ext.train import evaluate

    run = tmp_path / "run"
    seed = json.loads(run_btm("seed", "--data", data_dir, "--domains", ",".join(DOMAINS),
                              "--updates", "30", "--save-dir", run / "seed", *COMMON,
                              check=True).stdout)
    assert seed["num_updates"] == 30 and set(seed["valid_losses"]) == set(DOMAINS)
    seed_ckpt = run / "seed" / "checkpoint_best.pt"
    spec = load_checkpoint(seed_ckpt)["extra_state"]["btm"]["train_spec"]
    assert spec["domain_weights"] == [1.0, 1.0, 1.0]  # balanced mix

    seed_model = load_model(seed_ckpt)
    pad = seed_model.dictionary.pad()
    for domain in DOMAINS:
        init = run / "experts" / domain / "init.pt"
        rec = json.loads(run_btm("branch", "--out", init, "--from-seed", seed_ckpt, check=True).stdout)
        assert rec["parents"][0]["weight"] == 1.0 and rec["method"] == "seed"
        branch_json = json.loads((init.parent / "branch.json").read_text())
        assert branch_json["parents"][0]["path"] == str(seed_ckpt)
        init_state = load_checkpoint(init)
        assert init_state["extra_state"]["num_updates"] == 0 and init_state["last_optimizer_state"] is None
        out = json.loads(run_btm("train", "--data", data_dir, "--domain", domain, "--init", init,
                                 "--save-dir", init.parent, "--updates", "20", *COMMON,
                                 check=True).stdout)
        seed_loss = evaluate(seed_model.model, str(data_dir), [domain], 128, pad,
                             torch.device("cpu"), max_tokens=2048)[domain]
        assert out["valid_losses"][domain] < seed_loss, (domain, out["valid_losses"], seed_loss)


def test_branch_parents_posterior_and_errors(data_dir, tmp_path):
    from fairseq_ext.checkpoint import load_checkpoint
    from fairseq_ext.train import TrainSpec, train_lm
    ckpts = []
    for i, domain in enumerate(["bible", "legal"]):
        train_lm(TrainSpec(data_dir=str(data_dir), domains=[domain], save_dir=str(tmp_path / domain),
                           max_updates=0, seed=i, valid_max_tokens=512))
        ckpts.append(tmp_path / domain / "checkpoint_last.pt")
    out = tmp_path / "new" / "init.pt"
    rec = json.loads(run_btm("branch", "--out", out, "--parents",
                             f"{ckpts[0]}=1,{ckpts[1]}=3", check=True).stdout)
    assert [p["weight"] for p in rec["parents"]] == [0.25, 0.75]
    first = out.stat().st_mtime_ns
    run_btm("branch", "--out", out, "--parents", f"{ckpts[0]}=1,{ckpts[1]}=3", check=True)
    assert out.stat().st_mtime_ns == first  # finished branch left alone
    assert load_checkpoint(out)["extra_state"]["btm"]["branch"]["method"] == "explicit"

    bad = run_btm("branch", "--out", out, "--parents", f"{ckpts[0]}=-1,{ckpts[1]}=1")
    assert bad.returncode == 2 and "negative" in bad.stderr
    bad = run_btm("branch", "--out", out, "--from-seed", tmp_path / "nope.pt")
    assert bad.returncode == 2 and "nope.pt" in bad.stderr
    bad = run_btm("branch", "--out", out, "--from-seed", ckpts[0], "--parents", f"{ckpts[1]}=1")
    assert bad.returncode == 2 and "exactly one" in bad.stderr
    post = run_btm("branch", "--out", tmp_path / "p" / "init.pt", "--posterior", "--experts",
                   f"{ckpts[0]},{ckpts[1]}", "--domain", "code_python", "--data", data_dir,
                   "--top-k", "1")
    try:
        import fairseq_ext.priors  # noqa: F401
        has_priors = True
    except ImportError:
        has_priors = False
    if has_priors:
        assert post.returncode == 0, post.stderr
        assert len(json.loads(post.stdout)["parents"]) == 1
    else:
        assert post.returncode == 2 and "fairseq_ext.priors" in post.stderr
