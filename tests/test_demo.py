"""`make demo` shows why calibration matters: on pairs that share text and differ in length, DPO leaves the band
(alert) and lowers the held-out chosen log-likelihood; RC-DPO stays in band and does not. Real OpenRLHF train_dpo
runs on the tiny local model, on a shortened schedule (32 pairs, 2 epochs: 8 optimizer steps each; ~30 s on 2 CPU
cores)."""

import json
import re

import pytest

from po_plugins.tiny import make_pairs, pair_rows, shared_pair_rows


def test_shared_pairs_share_text_and_differ_in_length(tmp_path):
    rows = shared_pair_rows(40, seed=3)
    assert rows == shared_pair_rows(40, seed=3)
    assert rows != shared_pair_rows(40, seed=4)
    for r in rows:
        assert r["rejected"].startswith(r["chosen"] + " ")
        assert 2.0 < len(r["rejected"]) / len(r["chosen"]) < 4.5
    path = make_pairs(tmp_path / "s.jsonl", n=40, seed=3, kind="shared")
    assert [json.loads(x) for x in path.read_text().splitlines()] == rows
    # the default kind is unchanged
    plain = make_pairs(tmp_path / "p.jsonl", n=5, seed=3)
    assert [json.loads(x) for x in plain.read_text().splitlines()] == pair_rows(5, seed=3)
    with pytest.raises(ValueError, match="kind"):
        make_pairs(tmp_path / "x.jsonl", kind="nope")


def test_demo_dpo_leaves_the_band_and_rc_dpo_keeps_the_chosen_likelihood(tmp_path, capsys):
    from po_plugins.demo import run_demo

    res = run_demo(tmp_path / "demo", seed=0, pairs=32, epochs=2, n_eval=8)
    printed = capsys.readouterr().out
    dpo, rc = res["dpo"], res["rc_dpo"]
    assert dpo["steps"] == rc["steps"] == 8
    assert dpo["band_steps"] == rc["band_steps"] == 8
    # DPO: out of band (most steps), the alert fires, the held-out chosen log-likelihood falls (same pairs before and
    # after) and the per-step exact re-checks agree
    assert dpo["out_of_band"] >= 4, dpo
    assert dpo["alert"], dpo
    assert dpo["eval_delta_z_w"] < -1.0 and dpo["eval_chosen_down_frac"] >= 0.75, dpo
    assert dpo["recheck_delta_z_w_sum"] < 0 and dpo["probe_delta_z_w"] < 0, dpo
    assert dpo["alarm"] and not rc["alarm"], (dpo, rc)  # the measured-displacement alarm: DPO's chosen fell
    # RC-DPO on the same pairs from the same model: (nearly) every step in band, no alert, chosen does not fall
    assert rc["in_band_frac"] >= 0.75 and not rc["alert"], rc
    assert rc["eval_delta_z_w"] >= 0.0 and rc["recheck_delta_z_w_sum"] > 0 and rc["probe_delta_z_w"] > 0, rc
    # both lower the rejected continuation
    assert dpo["eval_delta_z_l"] < 0 and rc["eval_delta_z_l"] < 0
    assert "dpo: in band" in printed and "rc_dpo: in band" in printed
    assert (tmp_path / "demo" / "report" / "index.html").is_file()
    # the report shows the held-out numbers the demo printed (same pairs, same rounding), labelled apart from the
    # probe batch's, which are of training pairs
    said = {m[1]: (m[2], m[5], m[3]) for m in re.finditer(
        r"\[demo\]\s+(\w+): .*held-out chosen log-prob (\S+) nats \(falls on (\S+) of (8) pairs\), rejected (\S+);",
        printed)}
    assert set(said) == {"dpo", "rc_dpo"}, printed
    page = (tmp_path / "demo" / "report" / "index.html").read_text()
    cells = re.findall(r'<td>(\w+)</td><td>\w+</td><td>\d+</td><td>[^<]*</td><td>[^<]*</td>'
                       r'<td class="heldout_w">([^<]*)</td><td class="heldout_l">([^<]*)</td>'
                       r'<td class="heldout_down">([^<]*)</td>', page)
    assert {c[0]: c[1:] for c in cells} == said, (cells, said)
    assert "held-out pairs (8 pairs)" in page and "probe batch (training pairs)" in page
    assert float(said["dpo"][0]) == round(dpo["eval_delta_z_w"], 2) < -1.0
