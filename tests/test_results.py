"""The tidy results table (launcher/contract/results.py): schema, atomic append, replace-by-key."""
from __future__ import annotations

import math
import subprocess
import sys

import pandas as pd
import pytest

from launcher.contract.errors import BtmError
from launcher.contract.results import KEY_COLUMNS, REQUIRED_COLUMNS, append_results, read_results, validate_rows


def row(**over):
    r = dict(run="demo", method="ensemble_posterior", k=3, prior="ewma(alpha=0.3)", eval_domain="legal",
             split="test", tokens=1000, nll=2.5, ppl=math.exp(2.5), expert_forward_passes=3, seconds=1.5)
    r.update(over)
    return r


def test_append_writes_csv_and_parquet_with_the_same_typed_table(tmp_path):
    table = append_results(tmp_path, [row(), row(method="expert:legal", k=1, notes="x")])
    assert list(table.columns[:len(REQUIRED_COLUMNS)]) == list(REQUIRED_COLUMNS)
    csv = read_results(tmp_path / "results" / "results.csv")
    parquet = read_results(tmp_path / "results" / "results.parquet")
    pd.testing.assert_frame_equal(csv, parquet)
    pd.testing.assert_frame_equal(read_results(tmp_path), parquet)
    assert parquet["k"].dtype == "Int64" and parquet["nll"].dtype == "float64"
    assert parquet["method"].tolist() == ["ensemble_posterior", "expert:legal"]
    assert pd.isna(parquet["notes"][0]) and parquet["notes"][1] == "x"


def test_append_adds_new_keys_and_replaces_existing_ones(tmp_path):
    append_results(tmp_path, [row(), row(eval_domain="bible")])
    table = append_results(tmp_path, [row(nll=2.0, ppl=math.exp(2.0)), row(k=1, method="topk_prior")])
    assert len(table) == 3
    assert not table.duplicated(subset=KEY_COLUMNS).any()
    legal = table[(table.eval_domain == "legal") & (table.method == "ensemble_posterior")]
    assert legal["nll"].tolist() == [2.0]
    assert len(read_results(tmp_path)) == 3


def test_a_bad_append_leaves_the_table_untouched(tmp_path):
    append_results(tmp_path, [row()])
    before = (tmp_path / "results" / "results.csv").read_bytes()
    with pytest.raises(BtmError):
        append_results(tmp_path, [row(nll="oops")])
    assert (tmp_path / "results" / "results.csv").read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == [
        ".results.lock", "results.csv", "results.parquet"]


@pytest.mark.parametrize("bad, match", [
    (dict(nll="oops"), "column 'nll' must be a number; row 0 has 'oops'"),
    (dict(k=1.5), "column 'k' must be a whole number"),
    (dict(tokens=0), "column 'tokens' must be >= 1"),
    (dict(method="ensemble_magic"), "column 'method' row 0 has unknown method 'ensemble_magic'"),
    (dict(method="expert:bad/name"), "unknown method"),
    (dict(ppl=3.0), "column 'ppl' row 0 is 3.0 but exp"),
    (dict(seconds=-1), "column 'seconds' must be >= 0"),
    (dict(run=None), "column 'run' is empty in row 0"),
    (dict(run=5), "column 'run' must be text"),
    (dict(colour="red"), "unknown column 'colour'"),
])
def test_schema_errors_name_the_column(bad, match):
    with pytest.raises(BtmError, match=match):
        validate_rows([row(**bad)])


def test_missing_column_is_named():
    r = row()
    del r["expert_forward_passes"]
    with pytest.raises(BtmError, match="missing required column 'expert_forward_passes'"):
        validate_rows([r])


def test_reading_a_corrupt_table_names_the_file(tmp_path):
    (tmp_path / "results").mkdir()
    bad = tmp_path / "results" / "results.csv"
    bad.write_text("run,method\ndemo,dense\n")
    with pytest.raises(BtmError, match="results.csv.*missing required column 'k'"):
        read_results(bad)
    with pytest.raises(BtmError, match="no results table"):
        read_results(tmp_path / "elsewhere")


def test_append_validates_only_the_new_rows(tmp_path, monkeypatch):
    """The existing table was validated when append_results wrote it; an append re-checks only
    its schema, so its cost does not grow with the table (a spy on the real validator)."""
    import launcher.contract.results as results

    append_results(tmp_path, [row(prior=f"p{i}") for i in range(50)])
    seen = []
    real = results.validate_rows
    monkeypatch.setattr(results, "validate_rows", lambda rows, spec=None: seen.append(len(rows)) or real(rows, spec))
    table = append_results(tmp_path, [row(prior="new")])
    assert seen == [1] and len(table) == 51 and table["prior"].iloc[-1] == "new"


def _table_files(tmp_path):
    return {p.name: p.read_bytes() for p in (tmp_path / "results").iterdir() if not p.name.startswith(".")}


def test_appending_to_a_corrupt_parquet_names_the_file_and_changes_nothing(tmp_path, capsys):
    """A damaged parquet beside an intact csv is rebuilt from it with a warning (issue 17); with
    both damaged the append is refused, naming them, and changes nothing."""
    append_results(tmp_path, [row()])
    parquet, csv = tmp_path / "results" / "results.parquet", tmp_path / "results" / "results.csv"
    parquet.write_bytes(b"PAR1 this is not a parquet file")
    table = append_results(tmp_path, [row(eval_domain="bible")])
    assert len(table) == 2 and len(read_results(parquet)) == 2 and len(read_results(csv)) == 2
    assert "results.parquet" in capsys.readouterr().err
    parquet.write_bytes(b"PAR1 this is not a parquet file")
    csv.write_text("run,method\ndemo,dense\n")
    before = _table_files(tmp_path)
    with pytest.raises(BtmError, match=r"both files .*results\.parquet.*results\.csv"):
        append_results(tmp_path, [row(eval_domain="legal")])
    assert _table_files(tmp_path) == before


def test_a_truncated_csv_twin_is_refused_by_readers_and_rewritten_by_an_append(tmp_path, capsys):
    """results.csv cut after some rows still parses: readers must not use the fraction."""
    append_results(tmp_path, [row(eval_domain=d) for d in ("bible", "legal", "code")])
    csv = tmp_path / "results" / "results.csv"
    csv.write_text("".join(csv.read_text().splitlines(keepends=True)[:2]))
    with pytest.raises(BtmError, match=r"results\.csv holds 1 rows but its twin results\.parquet holds 3.*rm "):
        read_results(tmp_path)
    assert len(append_results(tmp_path, [row(eval_domain="fiction")])) == 4
    assert "results.csv holds 1 rows" in capsys.readouterr().err
    assert len(read_results(tmp_path)) == 4 and len(read_results(csv)) == 4


@pytest.mark.parametrize("frame, match", [
    (pd.DataFrame({"run": ["x"], "score": [1.0]}), "unknown column 'score'"),
    (pd.DataFrame([row()]).drop(columns="tokens"), "missing required column 'tokens'"),
    (pd.DataFrame([row(nll=-1.0, ppl=math.exp(-1.0))]), "column 'nll' row 0 must be a finite non-negative loss"),
])
def test_appending_to_a_foreign_table_names_the_file_and_the_column(tmp_path, frame, match):
    """A results.parquet that append_results did not write (other columns or plain pandas
    dtypes) gets the full validation, whose error names the file."""
    (tmp_path / "results").mkdir()
    frame.to_parquet(tmp_path / "results" / "results.parquet", index=False)
    before = _table_files(tmp_path)
    with pytest.raises(BtmError, match=r"results\.parquet: results: " + match):
        append_results(tmp_path, [row(eval_domain="bible")])
    assert _table_files(tmp_path) == before


def test_a_foreign_but_valid_table_is_typed_and_kept(tmp_path):
    """Plain pandas dtypes (object text, int64, float k) are not ours, so the old rows are
    validated in full; being valid, they are typed and kept."""
    (tmp_path / "results").mkdir()
    pd.DataFrame([row(k=3.0, eval_domain="code")]).to_parquet(tmp_path / "results" / "results.parquet", index=False)
    table = append_results(tmp_path, [row(eval_domain="bible")])
    assert table["eval_domain"].tolist() == ["code", "bible"]
    assert table["k"].dtype == "Int64" and table["method"].dtype == "string"
    pd.testing.assert_frame_equal(read_results(tmp_path), table)


def test_a_csv_only_table_is_validated_and_named(tmp_path):
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "results.csv").write_text("run,method\ndemo,dense\n")
    with pytest.raises(BtmError, match=r"results\.csv: results: missing required column 'k'"):
        append_results(tmp_path, [row()])
    assert not (tmp_path / "results" / "results.parquet").exists()


def test_results_imports_neither_fairseq_nor_torch():
    code = ("import sys; import launcher.contract.results; "
            "assert 'torch' not in sys.modules and 'fairseq' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
