"""`po-plugins diagnose` (issue 22, item 4): the band of a dataset's batches at the initial model, for the whole
responses and for their differing tokens, against autograd; shared starts; a recommendation; bad input."""

import json
import math
import subprocess
import sys

import pytest
import torch

from po_plugins.diagnose import diagnose, encode
from po_plugins.errors import DataError, OptionError


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    from po_plugins.tiny import make_assets

    return make_assets(tmp_path_factory.mktemp("diag"), n_train=24, n_eval=4, kind="shared")


def test_batch_band_equals_autograd_for_whole_and_differing_tokens(shared):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from po_plugins.prefix import shared_prefix_mask

    rep = diagnose(shared["model"], shared["train"], "rc_simpo", batch=8, max_batches=2)
    assert rep["summary"]["batches"] == 2 and rep["summary"]["objective_at_init"] == "simpo"
    tok = AutoTokenizer.from_pretrained(str(shared["model"]))
    model = AutoModelForCausalLM.from_pretrained(str(shared["model"]), dtype=torch.float32).eval()
    rows = [json.loads(x) for x in shared["train"].read_text().splitlines()][:8]
    enc = [encode(tok, r, False, 1024) for r in rows]
    seqs = [e[0] for e in enc] + [e[1] for e in enc]
    L = max(map(len, seqs))
    ids = torch.full((16, L), tok.pad_token_id or 0)
    att = torch.zeros(16, L, dtype=torch.long)
    resp = torch.zeros(16, L, dtype=torch.bool)
    for i, (s, p) in enumerate(zip(seqs, [e[2] for e in enc] * 2)):
        ids[i, :len(s)], att[i, :len(s)], resp[i, p:len(s)] = torch.tensor(s), 1, True
    lp = torch.log_softmax(model(input_ids=ids, attention_mask=att).logits[:, :-1].float(), -1)
    lp = lp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    sh = shared_prefix_mask(ids, att, resp, 8)[:, 1:]
    W = model.lm_head.weight
    for scope, keep in (("whole", resp[:, 1:]), ("differing", resp[:, 1:] & ~sh)):
        z = (lp * keep).sum(-1)
        (gw,) = torch.autograd.grad(z[:8].mean(), [W], retain_graph=True)
        (gl,) = torch.autograd.grad(z[8:].mean(), [W], retain_graph=True)
        got = rep["batches"][0][scope]
        assert got["rho"] == pytest.approx(float((gw * gl).sum() / (gw.norm() * gl.norm())), rel=1e-4)
        assert got["log_r_star"] == pytest.approx(math.log(float(gl.norm() / gw.norm())), abs=1e-4)
    assert rep["batches"][0]["shared_frac"] == pytest.approx(float(sh.sum() / resp[:, 1:].sum()))
    assert rep["batches"][0]["whole"]["rho"] != pytest.approx(rep["batches"][0]["differing"]["rho"], rel=1e-3)
    assert "--po.shared_prefix guard" in rep["summary"]["recommendation"]


def test_bad_input_is_one_line_naming_the_fix(shared, tmp_path):
    with pytest.raises(DataError, match=r"row 0 of .*train.jsonl has no 'answer' column \(--chosen_key names it"):
        diagnose(shared["model"], shared["train"], chosen_key="answer")
    with pytest.raises(OptionError, match=r"unknown loss 'rc_dpp' \(--loss\) \(did you mean 'rc_dpop'\?\)"):
        diagnose(shared["model"], shared["train"], loss="rc_dpp")
    with pytest.raises(DataError, match=r"fewer than one batch of 64 \(--batch\)"):
        diagnose(shared["model"], shared["train"], batch=64)


def test_the_command(shared, tmp_path):
    res = subprocess.run([sys.executable, "-m", "po_plugins.cli.diagnose", "--model", str(shared["model"]),
                          "--data", str(shared["train"]), "--loss", "rc_dpo", "--json", str(tmp_path / "r.json")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 5 and lines[0].startswith("[po_plugins] diagnose: 24 pairs in 3 batches of 8")
    assert "recommendation:" in lines[-1] and json.loads((tmp_path / "r.json").read_text())["summary"]["batches"] == 3
    res = subprocess.run([sys.executable, "-m", "po_plugins.cli.diagnose", "--model", str(tmp_path / "none"),
                          "--data", str(shared["train"])], capture_output=True, text=True, timeout=300)
    assert res.returncode == 1 and res.stderr.strip().splitlines()[-1].startswith("po_plugins: --model")
