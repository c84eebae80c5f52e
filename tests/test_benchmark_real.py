"""Experiments 2 and 3 of issue 6: their --quick modes run end to end through the real CLIs, and their data
construction (human-rated pairs, quality tiers, Bradley-Terry labels, the VADER corpus reader) is right."""

import io
import json
import math
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def _quick(script, tmp_path, timeout, *extra):
    """Run benchmarks/<script> --quick into tmp_path; return its last output line (the headline JSON)."""
    res = subprocess.run([sys.executable, str(BENCH / script), "--quick", "--out", str(tmp_path), *map(str, extra)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def _trace(path):
    return [json.loads(line) for line in path.read_text().splitlines() if '"step"' in line]


@pytest.mark.e2e
def test_displacement_quick(tmp_path):
    out = _quick("displacement.py", tmp_path, timeout=900)
    assert out["mode"] == "quick" and out["n_test"] == 16
    assert set(out["chosen_lr"]) == {"dpo", "simpo"}
    for loss in ("dpo", "rc_dpo", "simpo", "rc_simpo"):
        m = out[loss]
        assert m["n"] == 16 and m["steps"] == 4, m
        for key in ("acc_implicit", "acc_own", "chosen_up_frac", "in_band_frac"):
            assert 0.0 <= m[key] <= 1.0
        assert math.isfinite(m["dz_w"]) and math.isfinite(m["dz_l"])
        # the implicit-reward accuracy is the sign of dz_w - dz_l per pair: the means must agree in direction
        # when every pair agrees
        if m["acc_implicit"] == 1.0:
            assert m["dz_w"] > m["dz_l"]
    # calibration is active in the rc_ runs and not in the base runs
    assert out["dpo"]["alpha_last"] == 1.0 and out["rc_dpo"]["alpha_last"] != 1.0
    # SimPO is reference-free: with --po.ref_logp_keys its monitor's log-ratios start at ~0 (against the stored
    # initial-model log-probs), not at the raw log-likelihood (about -70 nats here)
    for loss in ("simpo", "rc_simpo"):
        run = tmp_path / "runs" / f"{loss}_lr{out['chosen_lr']['simpo']:g}"
        first = _trace(run / "po_band.jsonl")[0]
        assert abs(first["r_w"]) < 0.5 and abs(first["r_l"]) < 0.5 and first["z_w"] < -10, first
    assert Path(out["png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # pools are disjoint: no test snippet appears in the training pairs
    rows = {s: [json.loads(x) for x in (tmp_path / "data" / f"{s}.jsonl").read_text().splitlines()]
            for s in ("train", "test")}
    texts = {s: {r[k][0]["content"] for r in rows[s] for k in ("chosen", "rejected")} for s in rows}
    assert not texts["train"] & texts["test"]
    assert all(r["chosen_rating"] - r["rejected_rating"] >= 1.5 for s in rows for r in rows[s])


def test_displacement_pairs_follow_human_ratings(load_benchmark):
    mod = load_benchmark("displacement")
    snippets = [{"id": str(i), "rating": (i % 9) - 4.0, "text": f"snippet number {i} is here"} for i in range(300)]
    cfg = dict(mod.QUICK, train_pairs=40, val_pairs=10, test_pairs=10)
    pairs = mod.make_pairs(snippets, cfg)
    by_text = {s["text"]: s["rating"] for s in snippets}
    for split, rows in pairs.items():
        assert len(rows) == cfg[f"{split}_pairs"]
        for r in rows:
            hi, lo = by_text[r["chosen"][0]["content"]], by_text[r["rejected"][0]["content"]]
            assert hi == r["chosen_rating"] and lo == r["rejected_rating"] and hi - lo >= cfg["min_gap"]
    with pytest.raises(RuntimeError, match="rating gap"):
        mod.make_pairs([dict(s, rating=0.0) for s in snippets], cfg)


def test_tiers_and_bradley_terry_labels(load_benchmark):
    mod = load_benchmark("madpo_tiers")
    rows = [{"prompt": f"p{i}", "samples": [f"a{i}", f"b{i}"], "sample_rewards": [0.5 * (i % 5), 1.05],
             "human": f"h{i}", "human_reward": 2.5} for i in range(4000)]
    high, medium, low = (mod.tier_pairs(rows, t, seed=3) for t in ("high", "medium", "low"))
    has_human = [sum(p["chosen"].startswith("h") or p["rejected"].startswith("h") for p in x)
                 for x in (high, medium, low)]
    assert has_human == [0, 2000, 4000]
    for pairs in (high, medium, low):
        assert sorted(p["prompt"] for p in pairs) == sorted(r["prompt"] for r in rows)
    # medium/low keep the better of the two samples against the human continuation
    by_prompt = {r["prompt"]: r for r in rows}
    for p in low:
        r = by_prompt[p["prompt"]]
        best = max(zip(r["sample_rewards"], r["samples"]))[1]
        assert {p["chosen"], p["rejected"]} == {best, r["human"]}
    # Bradley-Terry: P(first response wins) = sigmoid(s1 - s2); here s1 - s2 = 0.5 * (i % 5) - 1.05
    for k in range(5):
        gap = 0.5 * k - 1.05
        group = [p for p in high if int(p["prompt"][1:]) % 5 == k]
        wins = sum(p["chosen"].startswith("a") for p in group) / len(group)
        assert abs(wins - 1 / (1 + math.exp(-gap))) < 0.045, (k, wins)
    # labels are seeded: same seed, same labels; another seed, other labels
    assert mod.tier_pairs(rows, "high", seed=3) == high
    assert mod.tier_pairs(rows, "high", seed=4) != high


@pytest.mark.e2e
def test_madpo_tiers_quick(tmp_path):
    out = _quick("madpo_tiers.py", tmp_path, timeout=1500)
    assert out["mode"] == "quick" and out["seeds"] == 1
    for method in ("madpo", "beta_dpo", "dpo", "ipo"):
        for tier in ("high", "medium", "low"):
            assert math.isfinite(out["table"][method][tier]["mean"])
            assert -3.0 <= out["table"][method][tier]["mean"] <= 3.0
    assert out["paper"]["madpo"]["high"] == 2.23
    # the MADPO runs went through the whole pipeline: reward model, scored margins for every pair, weighted DPO
    run = tmp_path / "runs" / "medium_seed0" / "madpo"
    pairs = (tmp_path / "data" / "medium_seed0" / "pairs.jsonl").read_text().splitlines()
    scored = [json.loads(x) for x in (run / "scored.jsonl").read_text().splitlines()]
    assert len(scored) == len(pairs) == out["n_pairs"]
    assert [r["chosen"] for r in scored] == [json.loads(x)["chosen"] for x in pairs]
    assert all(math.isfinite(r["rm_margin"]) for r in scored)
    assert (run / "rm" / "config.json").exists() and (run / "policy" / "config.json").exists()
    # the reward model's agreement with the gold order on held-out pairs (validation prompts, no ties)
    held = [json.loads(x) for x in (tmp_path / "data" / "heldout_pairs.jsonl").read_text().splitlines()]
    assert held and all(r["gold_chosen"] > r["gold_rejected"] for r in held)
    diag = out["reward_model"]["medium/0"]
    assert diag["heldout_pairs"] == len(held) and 0.0 <= diag["heldout_gold_agreement"] <= 1.0
    assert 0.0 <= diag["gold_agreement_untied"] <= 1.0
    # the generation stage wrote two samples per prompt
    gen = [json.loads(x) for x in (tmp_path / "data" / "generated.jsonl").read_text().splitlines()]
    assert len(gen) == out["n_pairs"] and all(len(r["samples"]) == 2 for r in gen)
    assert Path(out["png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.e2e
def test_madpo_tiers_oracle_quick(tmp_path):
    """Issue 13 item 4: MADPO on the gold reward difference (no reward model), one tier, through train_dpo."""
    import torch

    from po_plugins.madpo import margin_weights

    out = _quick("madpo_tiers.py", tmp_path, 600, "--margins", "oracle", "--tiers", "medium", "--workers", 1)
    assert out["mode"] == "quick" and out["margins"] == "oracle"
    assert set(out["table"]) == {"madpo_oracle", "beta_dpo", "dpo"}
    for method, cells in out["table"].items():
        assert set(cells) == {"medium"} and -3.0 <= cells["medium"]["mean"] <= 3.0, (method, cells)
    assert set(out["validation"]) == {f"madpo_oracle_tau{t:g}" for t in (6.9068,)} and out["tau"] == 6.9068
    # the margin column is the gold reward difference of the very pairs the baselines train on
    d = tmp_path / "data" / "medium_seed0"
    plain = [json.loads(x) for x in (d / "pairs.jsonl").read_text().splitlines()]
    gold = [json.loads(x) for x in (d / "pairs_gold.jsonl").read_text().splitlines()]
    assert len(gold) == len(plain) == out["n_pairs"]
    for p, g in zip(plain, gold):
        assert {k: g[k] for k in p} == p
        assert g["gold_margin"] == pytest.approx(p["gold_chosen"] - p["gold_rejected"])
    h = torch.tensor([g["gold_margin"] for g in gold])
    diag = out["oracle_margins"]["medium/0"]
    assert diag["label_agrees_with_gold"] == pytest.approx(float((h > 0).float().mean()))
    assert diag["w_flipped"] < 1.0 < diag["w_agree"]  # Bradley-Terry flips are damped, agreeing pairs amplified
    # MADPO trained on those margins (no reward model, no scoring) and its weights are the gold margins' weights
    run = tmp_path / "runs" / "medium_seed0" / "madpo_oracle"
    assert not (run / "rm").exists() and not (run / "scored.jsonl").exists()
    band = run / "policy" / "po_band.jsonl"
    meta = json.loads(band.read_text().splitlines()[0])["meta"]
    assert meta["loss"] == "madpo" and meta["hparams"]["tau"] == out["tau"] and meta["hparams"]["c_max"] == 4.0
    trace = _trace(band)
    w = margin_weights(h, c_max=4.0, lam=1.0, tau=out["tau"])
    assert trace and all(r["loss_name"] == "madpo" for r in trace)
    assert all(float(w.min()) - 1e-4 <= r["w_min"] <= r["w_max"] <= float(w.max()) + 1e-4 for r in trace)
    assert min(r["w_min"] for r in trace) < 0.9 and max(r["w_max"] for r in trace) > 1.05
    # the baselines are the default mode's runs: plain DPO has no weights
    assert _trace(tmp_path / "runs" / "medium_seed0" / "dpo" / "policy" / "po_band.jsonl")[0]["loss_name"] == "dpo"
    assert Path(out["png"]).name == "madpo_tiers_oracle_quick.png"


def test_movie_snippets_reader(tmp_path, monkeypatch, load_benchmark):
    """The reader takes the ground-truth file out of the tarball inside the sdist, without the network."""
    mod = load_benchmark("real_assets")
    lines = "".join(f"{i}\t{(i % 9) - 4:.2f}\tsnippet {i}, with\ttab\n" for i in range(1, 10_101))
    inner = io.BytesIO()
    with tarfile.open(fileobj=inner, mode="w:gz") as t:
        data = lines.encode()
        info = tarfile.TarInfo("hutto_ICWSM_2014/" + mod.MOVIE_FILE)
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
    sdist_dir = tmp_path / "downloads" / "vader-sdist"
    sdist_dir.mkdir(parents=True)
    with tarfile.open(sdist_dir / "vaderSentiment-3.3.2.tar.gz", "w:gz") as t:
        info = tarfile.TarInfo("vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz")
        info.size = len(inner.getvalue())
        t.addfile(info, io.BytesIO(inner.getvalue()))
    monkeypatch.setenv("PO_PLUGINS_CACHE", str(tmp_path))
    rows = mod.movie_snippets()
    assert len(rows) == 10_100
    assert rows[0] == {"id": "1", "rating": -3.0, "text": "snippet 1, with\ttab"}
    assert rows[-1]["id"] == "10100" and rows[-1]["rating"] == (10_100 % 9) - 4
