"""`po-plugins diagnose` (issue 22, item 4): the band of a dataset's batches at the initial model, for the whole
responses and for their differing tokens, against autograd; several objectives from one forward per batch; the
picture; shared starts; a recommendation; bad input; and the first steps of a real OpenRLHF run's monitor."""

import importlib.util
import json
import math
import subprocess
import sys

import pytest
import torch

import po_plugins.diagnose as dg
from po_plugins.band import band_stats
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
    assert rep["batches"] == 2 and rep["objectives"]["rc_simpo"]["objective_at_init"] == "simpo"
    tok = AutoTokenizer.from_pretrained(str(shared["model"]))
    model = AutoModelForCausalLM.from_pretrained(str(shared["model"]), dtype=torch.float32).eval()
    rows = [json.loads(x) for x in shared["train"].read_text().splitlines()][:8]
    enc = [encode(tok, r, False, 512) for r in rows]
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
        got = rep["per_batch"][0][scope]
        assert got["sw_norm"] == pytest.approx(float(gw.norm()), rel=1e-4)
        assert got["sl_norm"] == pytest.approx(float(gl.norm()), rel=1e-4)
        assert got["rho"] == pytest.approx(float((gw * gl).sum() / (gw.norm() * gl.norm())), rel=1e-4)
        assert got["log_r_star"] == pytest.approx(math.log(float(gl.norm() / gw.norm())), abs=1e-4)
        # the objective's verdict is the band of its incentives and these statistics
        ob = rep["objectives"]["rc_simpo"]["batches"][0]
        want = band_stats(ob["d_w"], ob["d_l"], got["sw_norm"], got["sl_norm"], got["sw_dot_sl"])
        assert ob[scope]["in_band"] == bool(want["in_band"]) and ob[scope]["log_r"] == pytest.approx(want["log_r"])
    assert rep["per_batch"][0]["shared_frac"] == pytest.approx(float(sh.sum() / resp[:, 1:].sum()))
    n = resp[:, 1:].sum(-1).float()
    assert rep["per_batch"][0]["tokens_l"] == pytest.approx(float(n[8:].mean()))
    assert rep["per_batch"][0]["length_ratio"] == pytest.approx(float((n[8:] / n[:8]).median()), rel=0.3)
    assert rep["per_batch"][0]["whole"]["rho"] != pytest.approx(rep["per_batch"][0]["differing"]["rho"], rel=1e-3)
    assert "--po.shared_prefix guard" in rep["objectives"]["rc_simpo"]["recommendation"]


def test_several_objectives_share_one_forward_per_batch(shared, monkeypatch):
    calls = []
    real = dg.batch_scores
    monkeypatch.setattr(dg, "batch_scores", lambda *a, **k: calls.append(1) or real(*a, **k))
    rep = diagnose(shared["model"], shared["train"], "dpo, simpo,rc_dpo,ipo,dpo", batch=8, max_batches=3)
    assert len(calls) == 3  # one model pass per batch, whatever the number of objectives
    assert list(rep["objectives"]) == ["dpo", "simpo", "rc_dpo", "ipo"] and rep["batches"] == 3
    per = rep["per_batch"]
    assert rep["rho"]["whole"]["median"] == pytest.approx(sorted(b["whole"]["rho"] for b in per)[1])
    assert rep["length_ratio"]["median"] > 2  # the rejected response continues the chosen one: ~3x as long
    dpo, simpo, rc = (rep["objectives"][k] for k in ("dpo", "simpo", "rc_dpo"))
    assert all(b["whole"]["log_r"] == 0.0 for b in dpo["batches"]) and dpo["ratio_median"] == pytest.approx(1.0)
    assert rc["calibrated"] and rc["objective_at_init"] == "dpo" and rc["batches"] == dpo["batches"]
    for name, s in rep["objectives"].items():
        for scope in ("whole", "differing"):
            verdicts = [b[scope]["in_band"] for b in s["batches"]]
            assert s[f"in_band_frac_{scope}"] == pytest.approx(sum(verdicts) / 3), name
            assert sum(s[f"edges_{scope}"].values()) == verdicts.count(False), name
        for b, p in zip(s["batches"], per):  # the band of the objective's incentives and the batch's statistics
            w = p["whole"]
            assert b["whole"]["in_band"] == bool(band_stats(b["d_w"], b["d_l"], w["sw_norm"], w["sl_norm"],
                                                            w["sw_dot_sl"])["in_band"]), name
    # SimPO's ratio is the length ratio (β, γ only through the sigmoid weights): far above DPO's 1 on these pairs
    assert simpo["ratio_median"] > 2 and simpo["edges_whole"] != dpo["edges_whole"]
    assert simpo["hparams"] == {"beta": 2.0, "gamma": 1.0}
    beta = diagnose(shared["model"], shared["train"], "simpo,dpo", batch=8, max_batches=1, beta=0.5)["objectives"]
    assert beta["simpo"]["hparams"]["beta"] == 0.5 and beta["dpo"]["batches"][0]["d_w"] == pytest.approx(0.25)
    lines = dg.describe(rep)
    assert lines[0].startswith("[po_plugins] diagnose: 24 pairs in 3 batches of 8")
    assert [ln.split()[0] for ln in lines[4:8]] == ["dpo", "simpo", "rc_dpo", "ipo"]
    assert lines[-4].startswith("  dpo: ") and lines[-1].startswith("  ipo: ")


def test_the_picture(shared, tmp_path, monkeypatch):
    rep = diagnose(shared["model"], shared["train"], "dpo,simpo", batch=8, max_batches=2)
    pts = dg.band_points(rep)
    assert {k: len(v) for k, v in pts.items()} == {"dpo": 2, "simpo": 2}
    b = rep["objectives"]["dpo"]["batches"][0]["whole"]
    assert pts["dpo"][0] == (b["log_r_star"] - b["log_r"], b["rho"])
    # in band iff |log r* − log r| ≤ −log ρ, the region the picture shades
    for name, s in rep["objectives"].items():
        for (x, rho), ob in zip(pts[name], s["batches"]):
            assert ob["whole"]["in_band"] == (rho <= 0 or abs(x) <= -math.log(rho)), name
    png = dg.plot(rep, tmp_path / "p" / "band.png")
    assert png.exists() and png.read_bytes()[:4] == b"\x89PNG"
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # matplotlib missing: one line naming the fix
    with pytest.raises(OptionError, match=r"needs matplotlib: pip install matplotlib \(or --plot none"):
        dg.plot(rep, tmp_path / "q.png")


def test_bad_input_is_one_line_naming_the_fix(shared, tmp_path):
    with pytest.raises(DataError, match=r"row 0 of .*train.jsonl has no 'answer' column \(--chosen_key names it"):
        diagnose(shared["model"], shared["train"], chosen_key="answer")
    with pytest.raises(OptionError, match=r"unknown loss 'rc_dpp' \(--loss\) \(did you mean 'rc_dpop'\?\)"):
        diagnose(shared["model"], shared["train"], loss="dpo,rc_dpp")
    with pytest.raises(OptionError, match=r"--loss 'dpo,': an empty name"):
        diagnose(shared["model"], shared["train"], loss="dpo,")
    with pytest.raises(OptionError, match=r"--loss madpo needs reward-model margins: name their column with "
                                          r"--margin_key"):
        diagnose(shared["model"], shared["train"], loss="dpo,madpo")
    with pytest.raises(DataError, match=r"fewer than one batch of 64 \(--batch\)"):
        diagnose(shared["model"], shared["train"], batch=64)
    with pytest.raises(OptionError, match=r"--beta -1.0: loss 'dpo': beta must be a positive number"):
        diagnose(shared["model"], shared["train"], beta=-1.0)
    if not torch.cuda.is_available():
        with pytest.raises(OptionError, match=r"--device cuda: torch sees no CUDA device here; use --device cpu"):
            diagnose(shared["model"], shared["train"], device="cuda")
    msgs = tmp_path / "msgs.jsonl"
    msgs.write_text(json.dumps({"prompt": [{"role": "user", "content": "Hi"}], "chosen": "a", "rejected": "b"}) + "\n")
    with pytest.raises(DataError, match=r"row 0: 'prompt' is a list of messages; add --apply_chat_template"):
        diagnose(shared["model"], msgs, batch=1)
    margins = tmp_path / "m.jsonl"
    margins.write_text(json.dumps({"prompt": "p", "chosen": "a", "rejected": "b", "rm": "n/a"}) + "\n")
    with pytest.raises(DataError, match=r"row 0 of .*m.jsonl: margin 'rm' is 'n/a', not a finite number"):
        diagnose(shared["model"], margins, loss="madpo", margin_key="rm", batch=1)


def test_the_command(shared, tmp_path, capsys):
    from po_plugins.cli._common import run
    from po_plugins.cli.diagnose import main

    base = ["--model", str(shared["model"]), "--dataset", str(shared["train"])]
    res = subprocess.run([sys.executable, "-m", "po_plugins.cli.diagnose", *base, "--loss", "rc_dpo,simpo", "--json",
                          str(tmp_path / "r.json")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    lines = res.stdout.strip().splitlines()
    assert lines[0].startswith("[po_plugins] diagnose: 24 pairs in 3 batches of 8") and len(lines) == 10
    assert lines[3].split()[:3] == ["objective", "in", "band"] and lines[4].startswith("  rc_dpo (r of dpo")
    assert lines[-2] == f"  report: {tmp_path / 'r.json'}" and lines[-1] == f"  picture: {tmp_path / 'r.png'}"
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["batches"] == 3 and list(rep["objectives"]) == ["rc_dpo", "simpo"] and (tmp_path / "r.png").exists()
    assert rep["objectives"]["simpo"]["recommendation"] in lines[-3]
    assert main([*base, "--json", str(tmp_path / "s.json"), "--plot", "none", "--max_batches", "1"]) == 0
    assert (tmp_path / "s.json").exists() and not (tmp_path / "s.png").exists()
    assert main([*base, "--plot", str(tmp_path / "only.png"), "--max_batches", "1"]) == 0
    assert (tmp_path / "only.png").exists()
    with pytest.raises(SystemExit, match=r"^po_plugins: --model .*none: no such folder"):
        run(main, ["--model", str(tmp_path / "none"), "--data", str(shared["train"])])
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--plot" in capsys.readouterr().out


def test_encoding_is_openrlhfs(shared, tmp_path):
    """The token ids and prompt lengths are those of OpenRLHF's RewardDataset (is_dpo) for the same flags, plain and
    with the chat template, and rows OpenRLHF drops are dropped."""
    pytest.importorskip("openrlhf")
    from types import SimpleNamespace

    from openrlhf.datasets.reward_dataset import RewardDataset
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(shared["model"]))
    rows = [json.loads(x) for x in shared["train"].read_text().splitlines()][:6]
    rows[1]["chosen"] += "\n\n"  # trailing newlines are stripped
    rows[2]["rejected"] += " " + tok.eos_token  # no second eos
    rows[3]["prompt"] = "word " * 60  # a prompt of max_len − 2 tokens or more: dropped
    chats = [{k: [{"role": "user" if k == "prompt" else "assistant", "content": r[k]}] for k in r} for r in rows]
    for chat, data, template in ((False, rows, None), (True, chats, None), (False, rows, "Q: {}\nA: ")):
        args = SimpleNamespace(data=SimpleNamespace(prompt_key="prompt", chosen_key="chosen", rejected_key="rejected",
                                                    apply_chat_template=chat, tokenizer_chat_template=None))
        ds = RewardDataset.__new__(RewardDataset)
        ds.is_dpo, ds.tokenizer, ds.max_length, ds.input_template = True, tok, 40, template
        ds.prompt_key, ds.chosen_key, ds.rejected_key = "prompt", "chosen", "rejected"
        ds.strategy = SimpleNamespace(args=args)
        ds.apply_chat_template = tok.apply_chat_template if chat else False
        items = [ds.process_data(r) for r in data]
        items = [it for it in items if it["prompt"] is not None]
        ds.prompts, ds.chosens = [it["prompt"] for it in items], [it["chosen"] for it in items]
        ds.rejects, ds.extras = [it["reject"] for it in items], [it["extra"] for it in items]
        ours = [e for e in (encode(tok, r, chat, 40, template) for r in data) if e is not None]
        assert len(ours) == len(ds) == 5
        for i, (cw, rl, plen) in enumerate(ours):
            c_ids, _, r_ids, _, extra = ds[i]
            assert cw == c_ids[0].tolist() and rl == r_ids[0].tolist() and plen == extra, (chat, template, i)


@pytest.mark.skipif(importlib.util.find_spec("openrlhf") is None,
                    reason="openrlhf not installed (make test installs it)")
def test_diagnose_equals_the_monitors_first_steps(shared, tmp_path):
    """The real OpenRLHF train_dpo with the band monitor, at learning rate 0 so that every step is at the initial
    model: each step's record (its pairs drawn by OpenRLHF's sampler with --train.seed 42, one micro-batch of 4)
    equals diagnose's batch of the same rank with --train_seed 42, bit for bit in bf16 (the training dtype), for the
    demo's plain-text pairs under DPO and the same pairs as chat messages under SimPO (the binding regime's format).
    In fp32 diagnose differs from the bf16 run by the bf16 forward's rounding only."""
    from po_plugins.tiny import run_module

    chat = tmp_path / "chat.jsonl"
    chat.write_text("".join(json.dumps({k: [{"role": "user" if k == "prompt" else "assistant", "content": v}]
                                        for k, v in json.loads(x).items()}) + "\n"
                            for x in shared["train"].read_text().splitlines()))
    for loss, data, extra in (("dpo", shared["train"], []), ("simpo", chat, ["--data.apply_chat_template"])):
        out = tmp_path / loss
        res = run_module("po_plugins.cli.train_dpo", [
            "--loss", loss, "--po.monitor", "--model.model_name_or_path", shared["model"], "--data.dataset", data,
            "--data.prompt_key", "prompt", "--data.chosen_key", "chosen", "--data.rejected_key", "rejected",
            "--data.max_len", "64", "--train.micro_batch_size", "4", "--train.batch_size", "4",
            "--train.max_epochs", "1", "--train.seed", "42", "--ds.attn_implementation", "eager",
            "--ds.zero_stage", "0", "--adam.lr", "0", "--lr_warmup_ratio", "0", "--ckpt.output_dir", out, *extra],
            tmp_path)
        assert res.returncode == 0, res.stderr[-4000:]
        recs = [json.loads(x) for x in (out / "po_band.jsonl").read_text().splitlines()[1:]]
        assert len(recs) == 6
        rep = diagnose(shared["model"], data, loss, chat=bool(extra), batch=4, max_batches=6, max_len=64,
                       train_seed=42, dtype="bf16", attn_implementation="eager")
        for rec, batch, ob in zip(recs, rep["per_batch"], rep["objectives"][loss]["batches"]):
            w = batch["whole"]
            for k in ("sw_norm", "sl_norm", "sw_dot_sl", "rho", "log_r_star"):
                assert w[k] == pytest.approx(rec[k], rel=1e-4, abs=1e-6), (loss, rec["step"], k)
            assert ob["whole"]["log_r"] == pytest.approx(rec["log_r"], rel=1e-4, abs=1e-6), (loss, rec["step"])
            assert ob["d_w"] / ob["d_l"] == pytest.approx(rec["d_w"] / rec["d_l"], rel=1e-4)
            assert ob["whole"]["in_band"] == bool(rec["in_band"]) and ob["whole"]["edge"] == rec["edge"]
            assert batch["shared_frac"] == pytest.approx(rec["shared_frac"], rel=1e-6)
        assert rep["encoding"]["train_seed"] == 42 and {r["edge"] for r in recs} - {None}  # the band binds here
        if loss == "dpo":
            fp32 = diagnose(shared["model"], data, loss, batch=4, max_batches=1, max_len=64, train_seed=42,
                            attn_implementation="eager")["per_batch"][0]["whole"]
            for k in ("sw_norm", "sl_norm", "rho", "log_r_star"):
                assert fp32[k] == pytest.approx(recs[0][k], rel=2e-3), k
