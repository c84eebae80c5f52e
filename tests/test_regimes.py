"""benchmarks/regimes.py (issue 21, item 4): the fact-edit and human-rated regimes' data are what the page says, and
its --quick mode trains and evaluates through the real command end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def test_fact_pairs_are_gold_labelled_and_held_out_by_country(load_benchmark):
    mod = load_benchmark("regimes")
    cfg = mod.FULL["fact_edit"]
    pairs, questions, gold = mod.fact_data(cfg)
    capital = dict(mod.CAPITALS)
    assert len(pairs["train"]) == 48 * 3 and len(pairs["test"]) == 16 * 3 * 2
    countries = {s: {r["chosen"][0]["content"].split(" is ")[0][len("The capital of "):] for r in rows}
                 for s, rows in pairs.items()}
    assert not countries["train"] & countries["test"] and len(countries["test"]) == 16
    for rows in pairs.values():
        for r in rows:
            c = r["chosen"][0]["content"][len("The capital of "):-1].split(" is ")
            w = r["rejected"][0]["content"][len("The capital of "):-1].split(" is ")
            assert c[0] == w[0] and capital[c[0]] == c[1] == r["capital"] and w[1] != c[1]
            assert c[0] in r["prompt"][0]["content"]
    assert len({(r["prompt"][0]["content"], r["rejected"][0]["content"]) for r in pairs["test"]}) == 96
    q = questions[0]
    right = capital[[c for c in capital if c in q][0]]
    assert gold([q, q], [f"It is {right.lower()}.", "It is Atlantis."]) == [1.0, 0.0]


def _quick(tmp_path, regime: str, losses: str) -> dict:
    """benchmarks/regimes.py --quick, one seed: its last line, the headline JSON."""
    res = subprocess.run([sys.executable, str(BENCH / "regimes.py"), "--regime", regime, "--quick", "--out",
                          str(tmp_path), "--seeds", "1", "--losses", losses], capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_regimes_quick_fact_edit_end_to_end(tmp_path):
    head = _quick(tmp_path, "fact_edit", "dpo,rc_dpo+rc_target=nearest")
    assert head["regime"] == "fact_edit" and head["n_train"] == 144 and head["n_test"] == 96
    assert head["test_shared_pairs_frac"] == 1.0  # every pair shares "The capital of X is"
    for setting in ("dpo", "rc_dpo+rc_target=nearest"):
        s = head["summary"][setting]
        assert abs(s["dz_w"][0] - s["dz_w_shared"][0] - s["dz_w_rest"][0]) < 1e-6
        assert 0.0 <= s["in_band_frac"][0] <= 1.0 and 0.0 <= s["own_gold"][0] <= 1.0
    assert (tmp_path / "fact_edit" / "runs" / "rc_dpo+rc_target=nearest_lr0.005" / "result.json").exists()
    assert head["per_seed"]["dpo"][0]["alpha_last"] == 1.0


def test_regimes_quick_human_end_to_end(tmp_path):
    head = _quick(tmp_path, "human", "simpo")
    assert head["regime"] == "human" and head["n_train"] == 32 and head["n_test"] == 16
    assert set(head["summary"]) == {"simpo"}
