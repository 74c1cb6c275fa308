"""Config validation: every bad input gets one error naming the file, the key and the value."""
from __future__ import annotations

import re
import textwrap

import pytest
import yaml

from launcher.config import load_config, named_configs, parse_config
from launcher.contract.errors import BtmError

BASE = {
    "name": "t",
    "domains": {"train": ["bible", "legal"], "eval": ["bible"]},
    "model": {"preset": "tiny"},
}


def _with(path: str, value):
    data = yaml.safe_load(yaml.safe_dump(BASE))
    node = data
    *parents, last = path.split(".")
    for p in parents:
        node = node.setdefault(p, {})
    node[last] = value
    return yaml.safe_dump(data, sort_keys=False)


def _error(text: str) -> str:
    with pytest.raises(BtmError) as e:
        parse_config(text, "cfg.yaml")
    return str(e.value)


def test_valid_config_parses_with_defaults():
    cfg = parse_config(yaml.safe_dump(BASE), "cfg.yaml")
    assert cfg.expert_names == ["bible", "legal"]
    assert cfg.total_updates == 300 and cfg.total_gpus == 1  # the tiny preset's
    assert cfg.executor == "local" and cfg.profile == "local"


@pytest.mark.parametrize("key,value,expected", [
    ("modle", {"preset": "tiny"}, ["cfg.yaml", "modle", "did you mean 'model'"]),
    ("budget.seed_fracton", 0.3, ["budget.seed_fracton", "did you mean 'seed_fraction'"]),
    ("budget.seed_fraction", "half", ["budget.seed_fraction", "expected a number", "'half'"]),
    ("budget.total_updates", 1.5, ["budget.total_updates", "expected an integer"]),
    ("budget.total_updates", True, ["budget.total_updates", "expected an integer"]),
    ("domains.train", "bible", ["domains.train", "expected a list"]),
    ("budget.seed_fraction", 1.0, ["budget.seed_fraction", "[0, 1)"]),
    ("model.preset", "125M", ["model.preset", "'125M'", "did you mean '125m'"]),
    ("model.preset", "huge", ["model.preset", "unknown model preset", "1.3b"]),
    ("profile", "slurm-tset", ["profile", "unknown cluster profile", "did you mean 'slurm-test'"]),
    ("executor", "kubernetes", ["executor", "'kubernetes'"]),
    ("method", "moe", ["method", "'moe'"]),
    ("branching.rule", "random", ["branching.rule", "'random'"]),
    ("evaluation.methods", ["ensemble_uniform", "ensmble_prior"], ["evaluation.methods[1]", "did you mean 'ensemble_prior'"]),
    ("baselines", ["dense", "moe"], ["baselines[1]", "'moe'"]),
    ("domains.train", ["bible", "bible"], ["domains.train", "twice"]),
    ("corpus.shard_mb", 0, ["corpus.shard_mb", "must be in (0, inf], got 0"]),
    ("corpus.shard_tasks", 0, ["corpus.shard_tasks", "must be in [1, inf], got 0"]),
])
def test_bad_values_name_the_key(key, value, expected):
    message = _error(_with(key, value))
    assert message.startswith("cfg.yaml")
    for part in expected:
        assert part in message, message


@pytest.mark.parametrize("bad", ["a/b", "..", "../etc", "x\ny", "a b", "a;rm -rf ~", "$(id)", "`id`", "a|b",
                                 "-rf", "a'b", ""])
@pytest.mark.parametrize("where", ["domains.train", "domains.eval", "name", "domains.incremental"])
def test_unsafe_names_are_rejected(bad, where):
    if where == "name":
        text = _with("name", bad)
    else:
        text = _with(where, ["bible", bad] if where != "domains.incremental" else [bad])
    message = _error(text)
    assert where.split(".")[0] in message
    assert "invalid" in message


def test_error_carries_the_line_number():
    text = textwrap.dedent("""\
        name: t
        domains:
          train: [bible]
          eval: [bible]
        budget:
          seed_fraction: lots
        """)
    assert _error(text).startswith("cfg.yaml:6: budget.seed_fraction")


def test_not_yaml_and_not_a_mapping():
    assert "not valid YAML" in _error("name: [unclosed\n")
    assert "mapping" in _error("- a\n- b\n")


def test_unknown_corpus_domain_names_the_corpus(tmp_path):
    corpus = tmp_path / "corpus"
    for d in ("bible", "legal"):
        (corpus / d).mkdir(parents=True)
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(_with("domains.eval", ["bibel"]))
    with pytest.raises(BtmError) as e:
        load_config(cfg_file, corpus=corpus)
    msg = str(e.value)
    assert "domains.eval[0]" in msg and "'bibel'" in msg and "did you mean 'bible'" in msg and str(cfg_file) in msg


def test_relative_corpus_path_is_relative_to_the_config_file(tmp_path):
    (tmp_path / "data" / "bible").mkdir(parents=True)
    (tmp_path / "data" / "legal").mkdir(parents=True)
    cfg_file = tmp_path / "sub" / "c.yaml"
    cfg_file.parent.mkdir()
    cfg_file.write_text(_with("corpus.path", "../data"))
    assert load_config(cfg_file).corpus.path == str((tmp_path / "data").resolve())


def test_unnamed_domains_are_every_domain_folder_of_the_corpus(tmp_path):
    """The paper configs name no domains: any corpus of the documented layout runs as written,
    one expert per domain folder (sorted), all of them evaluated; named sections stay as named."""
    corpus = tmp_path / "my_corpus"
    for d in ("zeta", "alpha", "mid"):
        (corpus / d).mkdir(parents=True)
    (corpus / ".cache").mkdir()  # hidden folders are not domains
    cfg = load_config("paper-125m", corpus=corpus)
    assert cfg.domains.train == cfg.domains.eval == ["alpha", "mid", "zeta"]
    assert cfg.expert_names == ["alpha", "mid", "zeta"]
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(yaml.safe_dump({"domains": {"train": ["mid"]}}))
    cfg = load_config(cfg_file, corpus=corpus)
    assert cfg.domains.train == ["mid"] and cfg.domains.eval == ["alpha", "mid", "zeta"]
    # The resolved lists are what the run directory's config.yaml keeps (resume, reconcile).
    assert parse_config(load_config("paper-125m", corpus=corpus).to_yaml()).domains.train == ["alpha", "mid", "zeta"]


@pytest.mark.parametrize("case,expected", [
    ("no corpus", ["paper-125m.yaml", "domains.train", "--corpus DIR"]),
    ("empty corpus", ["domains.train", "has no domain folders"]),
    ("bad folder name", ["domain folder of corpus", "'a b'"]),
    ("incremental is in the corpus", ["domains.incremental", "mid", "name domains.train"]),
])
def test_unnamed_domains_without_a_usable_corpus(tmp_path, case, expected):
    corpus = tmp_path / "c"
    corpus.mkdir()
    overrides = {}
    if case == "bad folder name":
        (corpus / "a b").mkdir()
    if case == "incremental is in the corpus":
        (corpus / "mid").mkdir()
        overrides = {"domains.incremental": ["mid"]}
    with pytest.raises(BtmError) as e:
        load_config("paper-125m", overrides, corpus=None if case == "no corpus" else corpus)
    for part in expected:
        assert part in str(e.value), str(e.value)


def test_unknown_named_config():
    with pytest.raises(BtmError, match="did you mean 'tiny'"):
        load_config("tinny")


@pytest.mark.parametrize("name", named_configs())
def test_named_configs_are_valid(name, paper_corpus):
    cfg = load_config(name, corpus=paper_corpus if name.startswith("paper-") else None)
    assert cfg.domains.train and cfg.domains.eval


def test_paper_configs_cover_the_presets(paper_corpus):
    names = named_configs()
    for preset in ("125m", "350m", "750m", "1.3b"):
        cfg = load_config(f"paper-{preset}", corpus=paper_corpus)
        assert cfg.model.preset == preset and len(cfg.domains.train) == 8
        assert set(cfg.baselines) == {"dense", "random_split"}
    assert {"tiny", "demo"} <= set(names)


def test_config_hash_is_stable_and_sensitive():
    a = parse_config(yaml.safe_dump(BASE), "a.yaml")
    b = parse_config(yaml.safe_dump(BASE), "b.yaml")
    c = parse_config(_with("budget.seed_fraction", 0.25), "c.yaml")
    assert a.config_hash() == b.config_hash() != c.config_hash()
    assert parse_config(a.to_yaml(), "x").to_dict() == a.to_dict()


@pytest.mark.parametrize("text, expected", [
    ("budget.seed_fraction=0.3", ("budget.seed_fraction", 0.3)),
    ("name=sf30", ("name", "sf30")),
    ("domains.train=[bible, legal]", ("domains.train", ["bible", "legal"])),
    ("clusters.k=8", ("clusters.k", 8)),
])
def test_set_parses_dotted_key_and_yaml_value(text, expected):
    from launcher.commands.run import parse_setting
    assert parse_setting(text) == expected


@pytest.mark.parametrize("text", ["seed_fraction", "=3", "budget..x=1", "a b=1", "budget.x=[1,"])
def test_set_rejects_malformed_settings(text):
    from launcher.commands.run import parse_setting
    with pytest.raises(BtmError, match="--set"):
        parse_setting(text)


def test_set_overrides_reach_the_config_and_its_validation(tmp_path):
    from launcher.commands.run import parse_setting
    cfg = parse_config(yaml.safe_dump(BASE),
                       overrides=dict(map(parse_setting, ["budget.seed_fraction=0.3", "name=sf30"])))
    assert (cfg.budget.seed_fraction, cfg.name) == (0.3, "sf30")
    with pytest.raises(BtmError, match="budget.seed_fraction"):
        parse_config(yaml.safe_dump(BASE), overrides=dict([parse_setting("budget.seed_fraction=lots")]))
    with pytest.raises(BtmError, match="budjet"):
        parse_config(yaml.safe_dump(BASE), overrides=dict([parse_setting("budjet.seed_fraction=0.3")]))


def test_run_set_flag_reaches_the_plan(tmp_path):
    from tests.conftest import run_btm, write_small_corpus
    corpus = write_small_corpus(tmp_path / "corpus", ["bible", "code_python", "legal"], {"train": 2, "valid": 1, "test": 1})
    proc = run_btm("run", "tiny", "--run-dir", tmp_path / "run", "--corpus", corpus, "--dry-run",
                   "--set", "budget.seed_fraction=0.25", "--set", "name=sf25", check=True)
    assert "run 'sf25'" in proc.stdout and "seed 6 updates" in proc.stdout  # 0.25 x 24 updates
    bad = run_btm("run", "tiny", "--run-dir", tmp_path / "run", "--corpus", corpus, "--dry-run",
                  "--set", "budget.seed_fraction")
    assert bad.returncode != 0 and "--set 'budget.seed_fraction'" in bad.stderr


def _numeric_fields(cls, prefix=""):
    import dataclasses
    import typing
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.metadata.get("internal"):
            continue
        tp, key = hints[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            yield from _numeric_fields(tp, key + ".")
        elif tp in (int, float, int | None, float | None):
            yield key, f


def test_every_numeric_key_declares_its_range_and_the_bounds_are_enforced():
    """A new numeric key without a range would pass --dry-run with any value (issue 17, class 7)."""
    from launcher.config import Config

    fields = dict(_numeric_fields(Config))
    assert {"corpus.vocab_size", "seed", "evaluation.top_k", "budget.seed_fraction"} <= set(fields)
    for key, f in fields.items():
        assert "min" in f.metadata or "above" in f.metadata, f"{key} declares no range"
        lowest = f.metadata["min"] - 1 if "min" in f.metadata else f.metadata["above"]
        outside = [lowest, *[f.metadata[k] + (k == "max") for k in ("max", "below") if k in f.metadata]]
        section, _, name = key.rpartition(".")
        for value in outside:
            data = dict(BASE)
            if section:
                data[section] = {**BASE.get(section, {}), name: value}
            else:
                data[name] = value
            with pytest.raises(BtmError, match=re.escape(f"{key}: must be in ")):
                parse_config(yaml.safe_dump(data))


def test_min_vocab_size_is_the_bound_data_prep_checks():
    from launcher.config_schema import MIN_VOCAB_SIZE
    spm = pytest.importorskip("fairseq_ext.spm_tokenizer")
    assert MIN_VOCAB_SIZE == spm.N_SPECIAL + 256 + 1
