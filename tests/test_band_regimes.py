"""benchmarks/band_regimes.py (issue 13, item 2): its --quick mode runs end to end, the regimes are built as the
page says, and the batch statistics behave as the band's geometry requires."""

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def test_band_regimes_quick(tmp_path, load_benchmark):
    res = subprocess.run([sys.executable, str(BENCH / "band_regimes.py"), "--quick", "--out", str(tmp_path)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    mod = load_benchmark("band_regimes")
    assert out["mode"] == "quick" and out["batch"] == 8
    reg = out["regimes"]
    assert list(reg) == mod.REGIMES
    for name, s in reg.items():
        assert s["pairs"] == 16 and s["batches"] == 2, (name, s)
        assert -1.0 <= s["rho_q1"] <= s["rho_median"] <= s["rho_q3"] <= 1.0, (name, s)
        assert s["r_star_median"] > 0 and math.isfinite(s["r_star_median"])
        assert 0.0 <= s["dpo_in_band_frac"] <= 1.0 and 0.0 <= s["pair_dpo_in_band_frac"] <= 1.0
    # the verbose side is ~3x the concise one, and the swap inverts r* but keeps rho and DPO's verdict
    conc, verb = reg["length_concise_chosen"], reg["length_verbose_chosen"]
    assert verb["tokens_w_mean"] > 2.5 * conc["tokens_w_mean"] and conc["r_star_median"] > 1.5
    assert abs(conc["rho_median"] - verb["rho_median"]) < 1e-6
    assert Path(out["png"]).exists()
    points = json.loads((tmp_path / "batches.json").read_text())
    assert {k: len(v) for k, v in points.items()} == {name: 2 for name in mod.REGIMES}
    assert verb["r_star_median"] < 1 / 1.5
    assert conc["dpo_in_band_frac"] == verb["dpo_in_band_frac"]
    # minimal edits share almost all text: their scores are far more aligned than unrelated snippets'
    assert reg["edit_sentiment"]["pair_rho_median"] > reg["unrelated_human"]["pair_rho_median"] + 0.2
    assert reg["edit_sentiment"]["rho_median"] > reg["unrelated_human"]["rho_median"]
    # the swap keeps the token count of a sentiment edit of one-token words; unrelated pairs are never identical
    assert reg["unrelated_human"]["identical_frac"] == 0.0


def test_identical_pair_and_edits(tmp_path, load_benchmark):
    mod = load_benchmark("band_regimes")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from po_plugins import tiny

    d = tiny.make_model(tmp_path / "m", hidden_size=32, layers=2, heads=4)
    tok = AutoTokenizer.from_pretrained(str(d))
    model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
    row = {"prompt": mod.msg("user", "How was the movie?"), "chosen": mod.msg("assistant", "It was great."),
           "rejected": mod.msg("assistant", "It was great.")}
    s = mod.batch_stats(model, tok, [row])
    assert abs(s["rho"] - 1) < 1e-5 and abs(s["r_star"] - 1) < 1e-5  # DPO on the band's edge (knife-edge verdict)
    # a pair with a strictly longer, aligned rejected side has the larger score: r* > 1
    long = {**row, "rejected": mod.msg("assistant", "It was great. " * 6)}
    assert mod.batch_stats(model, tok, [long])["r_star"] > 1
    # a sentiment edit changes exactly one word, to one of the opposite sign
    lex = mod.load_lexicon(quick=True)
    rows = mod.sentiment_edit_pairs([{"id": "0", "text": "The movie was great and the music was good."}], lex, 1, "Q")
    a, b = rows[0]["chosen"][0]["content"].split(), rows[0]["rejected"][0]["content"].split()
    diff = [(x, y) for x, y in zip(a, b) if x != y]
    assert len(a) == len(b) and len(diff) == 1
    assert lex[diff[0][0].strip(".")] > 0 > lex[diff[0][1].strip(".")]
    facts = mod.fact_pairs(8)
    assert all(f["chosen"] != f["rejected"] for f in facts)
