"""data.mixture: how the seed LM and the dense baseline sample the training domains."""
from __future__ import annotations

import os

import numpy as np
import pytest

from conftest import require_fairseq
from launcher.config import load_config
from launcher.contract.errors import BtmError
from launcher.plan import build_plan, format_plan
from launcher.profiles import load_profile
from launcher.records import spec_hash
from launcher.stages import find_unit, get_stage
from launcher.stages.training import domain_mixture

DOMAINS = ["bible", "code_python", "legal"]  # the tiny config's training domains


def _tiny(mixture=None):
    return load_config("tiny", overrides=None if mixture is None else {"data.mixture": mixture})


@pytest.mark.parametrize("mixture", ["balanced", "proportional", {"temperature": 2}, {"temperature": 0.5}])
def test_good_mixtures_parse(mixture):
    assert _tiny(mixture).data.mixture == mixture


def test_the_default_mixture_is_balanced():
    assert _tiny().data.mixture == "balanced"


@pytest.mark.parametrize("mixture, expected", [
    ("balance", r"data\.mixture: unknown mixture 'balance'; did you mean 'balanced'\?"),
    ("uniform", r"data\.mixture: unknown mixture 'uniform'; use balanced, proportional or \{temperature: T\}"),
    ({"temperature": 0}, r"data\.mixture\.temperature: must be a finite number > 0, got 0"),
    ({"temperature": -1.5}, r"data\.mixture\.temperature: must be a finite number > 0, got -1\.5"),
    ({"temperature": "hot"}, r"data\.mixture\.temperature: must be a finite number > 0, got 'hot'"),
    ({"temp": 2}, r"data\.mixture: expected balanced, proportional or a mapping \{temperature: T\}, got \{'temp': 2\}"),
    (3, r"data\.mixture: expected balanced, proportional or a mapping \{temperature: T\}, got 3"),
])
def test_bad_mixtures_name_the_key_and_value(mixture, expected):
    with pytest.raises(BtmError, match=expected):
        _tiny(mixture)


def test_seed_and_dense_units_record_the_mixture():
    cfg = _tiny({"temperature": 2})
    cfg.baselines = ["dense"]
    seed = find_unit(cfg, "seed", None).params
    dense = find_unit(cfg, "dense", None).params
    assert seed == {"name": "seed", "domains": DOMAINS, "init": None, "preset": "tiny", "max_updates": 12,
                    "tokens_per_batch": 1024, "seed": 1, "save_interval_updates": 4,
                    "mixture": {"temperature": 2}}
    assert dense["mixture"] == {"temperature": 2} and dense["max_updates"] == 24
    # The mixture is part of the spec hash: changing it reruns seed and dense, not the experts.
    other = _tiny("proportional")
    assert spec_hash(find_unit(other, "seed", None).params) != spec_hash(seed)
    assert find_unit(other, "train", "bible").params == find_unit(cfg, "train", "bible").params
    assert "mixture" not in find_unit(cfg, "train", "bible").params


@pytest.mark.parametrize("mixture, label", [("balanced", "mixture balanced"),
                                            ("proportional", "mixture proportional"),
                                            ({"temperature": 2}, "mixture temperature 2")])
def test_dry_run_header_shows_the_mixture(mixture, label):
    cfg = _tiny(mixture)
    text = format_plan(build_plan(cfg, load_profile("local"), "runs/x"))
    assert text.splitlines()[0].endswith(f", {label}")


def test_mixture_maps_to_the_trainers_weights_and_temperature():
    assert domain_mixture("balanced", 3) == ([1.0, 1.0, 1.0], 1.0)
    assert domain_mixture("proportional", 3) == (None, 1.0)
    assert domain_mixture({"temperature": 2}, 3) == (None, 2.0)


@pytest.fixture(scope="module")
def data_dir(small_corpus, tmp_path_factory):
    require_fairseq()
    from elm_testdata import build_data
    return build_data(small_corpus, tmp_path_factory.mktemp("data"), DOMAINS)


def _seed_sampling(tmp_path, data_dir, monkeypatch, mixture) -> np.ndarray:
    """The domain probabilities the trainer's sampler gets when the seed stage trains with
    ``mixture`` (the stage's real code path, up to fairseq_ext.train.train_lm)."""
    import fairseq_ext.train as trainer
    from fairseq_ext.streams import MixtureBlockStream
    from fairseq_ext.tasks.multidomain_lm import mixture_probs
    from launcher.stages.base import Ctx

    seen = {}

    class SamplerBuilt(Exception):
        pass

    def sampler_only(spec):  # what train_lm builds its batches from (fairseq_ext/train.py)
        probs = mixture_probs([_train_tokens(spec.data_dir, d) for d in spec.domains],
                              spec.domain_weights, spec.temperature)
        seen["probs"] = MixtureBlockStream(spec.data_dir, spec.domains, probs, 16, spec.seed).probs
        raise SamplerBuilt  # no training needed past the sampler

    monkeypatch.setattr(trainer, "train_lm", sampler_only)
    run_dir = tmp_path / str(mixture)
    run_dir.mkdir()
    (run_dir / "data").symlink_to(data_dir, target_is_directory=True)
    cfg = _tiny(mixture)
    stage = get_stage("seed")
    with pytest.raises(SamplerBuilt):
        stage.run(Ctx(run_dir, cfg, find_unit(cfg, "seed", None), stage))
    return seen["probs"]


def _train_tokens(data_dir: str, domain: str) -> int:
    """A domain's training tokens, counted as the trainer counts them (training/resume.py)."""
    from fairseq_ext.streams import read_tokens

    return len(read_tokens(os.path.join(data_dir, domain, "train")))


def test_balanced_and_proportional_seeds_sample_domains_differently(tmp_path, data_dir, monkeypatch):
    tokens = np.array([_train_tokens(str(data_dir), d) for d in DOMAINS], dtype=float)
    assert len(set(tokens)) == 3  # the domains differ in size, so the mixtures must differ
    balanced = _seed_sampling(tmp_path, data_dir, monkeypatch, "balanced")
    proportional = _seed_sampling(tmp_path, data_dir, monkeypatch, "proportional")
    tempered = _seed_sampling(tmp_path, data_dir, monkeypatch, {"temperature": 2})
    np.testing.assert_allclose(balanced, [1 / 3] * 3)
    np.testing.assert_allclose(proportional, tokens / tokens.sum())
    np.testing.assert_allclose(tempered, np.sqrt(tokens) / np.sqrt(tokens).sum())
    assert not np.allclose(balanced, proportional)
