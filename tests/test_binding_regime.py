"""benchmarks/binding_regime.py (issue 13, item 2, training): its --quick mode runs end to end through the real
label_pairs and train_dpo commands, the pairs are what the page says, and a re-run reuses every finished part."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"


def _run(out: Path):
    res = subprocess.run([sys.executable, str(BENCH / "binding_regime.py"), "--quick", "--out", str(out),
                          "--seeds", "1", "--losses", "dpo,rc_dpo"],
                         cwd=out.parent, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    last = res.stdout.strip().splitlines()[-1]
    head = json.loads(last, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    return head, res.stdout


def test_binding_regime_quick(tmp_path):
    out = tmp_path / "br"
    head, _ = _run(out)
    assert head["mode"] == "quick" and head["n_train"] == 32 and head["n_test"] == 16
    # gold labels: the reward decides, every kept pair has a strict preference, both directions occur
    rows = [json.loads(x) for x in (out / "data" / "train_labelled.jsonl").read_text().splitlines()]
    assert len(rows) == head["labelled_train"]
    assert all(r["chosen_reward"] > r["rejected_reward"] for r in rows)
    assert 0 < head["concise_chosen_frac"]["labelled"] < 1
    # the training set: a sample and its own continuation (shared prefix, longer), in the order the gold chose
    train = [json.loads(x) for x in (out / "data" / "train.jsonl").read_text().splitlines()]
    assert len(train) == 32
    by_text = {(r["chosen"][0]["content"], r["rejected"][0]["content"]): r for r in rows}
    for r in train:
        c, j = r["chosen"][0]["content"], r["rejected"][0]["content"]
        short, long_ = sorted((c, j), key=len)
        assert long_.startswith(short) and len(long_) > len(short), (c, j)
        assert r["chosen_reward"] == by_text[(c, j)]["chosen_reward"]
    geo = head["geometry"]
    assert geo["concise_chosen"]["r_star_median"] > 1 > geo["verbose_chosen"]["r_star_median"]
    assert geo["concise_chosen"]["tokens_l"] > 2.5 * geo["concise_chosen"]["tokens_w"]
    for loss in ("dpo", "rc_dpo"):
        s = head["summary"][loss]
        assert 0.0 <= s["in_band_frac"][0] <= 1.0 and 0.0 <= s["acc_implicit"][0] <= 1.0
        assert s["own_tokens"][0] > 0 and s["dz_w"][1] is None  # one seed: no interval
        # the token split (issue 21, item 1): shared start + rest = the whole change; the shared start has the same
        # context in both responses, so it moves the same in both
        r = json.loads(next((out / "runs").glob(f"{loss}_lr*/result.json")).read_text())
        assert r["shared_tokens"] > 0 and r["shared_pairs_frac"] == 1.0
        assert abs(r["dz_w_shared"] + r["dz_w_rest"] - r["dz_w"]) < 1e-6 * max(1.0, abs(r["dz_w"]))
        assert abs(r["dz_l_shared"] + r["dz_l_rest"] - r["dz_l"]) < 1e-6 * max(1.0, abs(r["dz_l"]))
        assert abs(r["dz_w_shared"] - r["dz_l_shared"]) < 1e-3 * max(1.0, abs(r["dz_w_shared"]))
    assert Path(head["png"]).exists()
    full = geo["full_model"]
    assert full["batches"] == 4 and all(-1 <= b["full_rho"] <= 1 for b in full["per_batch"])
    assert all(b["full_rc_pred_sign_w"] in (-1, 0, 1) for b in full["per_batch"])
    # resumable: a second run trains nothing and measures nothing again
    head2, log2 = _run(out)
    assert "trained" not in log2 and "generated" not in log2
    assert head2["summary"] == head["summary"] and head2["per_seed"] == head["per_seed"]


def test_full_model_band_of_the_head_weight_alone_is_the_head_band(tmp_path, load_benchmark):
    """full_geometry's autograd scores, restricted to the (untied) head weight, give the head band that
    band_regimes.batch_stats computes in closed form from hidden states (po_plugins.scores.step_score_sums)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from po_plugins.tiny import make_model, shared_pair_rows

    mod = load_benchmark("binding_regime")
    model_dir = make_model(tmp_path / "m", hidden_size=32, layers=2, heads=4)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    rows = [{"prompt": mod.msg("user", r["prompt"]), "chosen": mod.msg("assistant", r["chosen"]),
             "rejected": mod.msg("assistant", r["rejected"])} for r in shared_pair_rows(16, seed=3)]
    res = mod.full_geometry(model, tok, rows, 8, 2, params=[model.lm_head.weight])
    assert res["batches"] == 2
    for b in res["per_batch"]:
        assert math.isclose(b["full_rho"], b["head_rho"], rel_tol=1e-4, abs_tol=1e-5), b
        assert math.isclose(b["full_r_star"], b["head_r_star"], rel_tol=1e-4), b
        assert b["full_dpo_in_band"] == b["head_dpo_in_band"]
    whole = mod.full_geometry(model, tok, rows, 8, 2)  # every parameter: a different (larger) score
    assert whole["per_batch"][0]["full_rho"] != res["per_batch"][0]["full_rho"]
