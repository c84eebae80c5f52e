"""MADPO stage 1.5: po_plugins.cli.score_margins on a tiny RM trained by po_plugins.cli.train_rm (stock train_rm).

Checks: rows/order/columns kept; margins equal an independent one-pair-at-a-time computation with OpenRLHF's
RewardDataset formatting; reference log-probs equal an independent per-pair sum over response tokens; the same
bytes under 2 processes and after an interrupted run resumed; clear errors (NaN scores, `margin`, missing
column); the benchmark's --quick run.
"""

import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from po_plugins.tiny import make_assets, pair_rows, run_module

ROOT = Path(__file__).resolve().parents[1]
needs_host = pytest.mark.skipif(
    importlib.util.find_spec("openrlhf") is None or importlib.util.find_spec("deepspeed") is None,
    reason="openrlhf/deepspeed not installed (make test installs them)",
)
MAX_LEN = 96
REF_COLS = ["ref_chosen_logp", "ref_rejected_logp"]


def run(module, args, cwd, nproc=1, env_extra=None, check=True, timeout=300):
    res = run_module(module, args, cwd, nproc=nproc, env_extra=env_extra, timeout=timeout)
    if check:
        assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-6000:])
    return res


def scoring_rows():
    """Pairs with an `id` and a nested `meta` column, lengths shuffled, one prompt too long for DPO formatting."""
    rng = random.Random(7)
    rows = []
    for k, row in enumerate(pair_rows(23, seed=5)):
        reps = rng.randint(1, 4)
        rows.append({"id": f"pair-{k}", "prompt": row["prompt"], "chosen": " ".join([row["chosen"]] * reps),
                     "rejected": " ".join([row["rejected"]] * rng.randint(1, 4)), "meta": {"k": k, "w": 0.5 * k}})
    rows.append({"id": "long-prompt", "prompt": " ".join(["Tell me about the movie."] * 30), "chosen": "It was great.",
                 "rejected": "It was awful.", "meta": {"k": 23, "w": 11.5}})
    rng.shuffle(rows)
    return rows


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("score")
    assets = make_assets(root / "tiny", n_train=32, n_eval=8)
    run("po_plugins.cli.train_rm", [
        "--model.model_name_or_path", assets["model"], "--data.dataset", assets["train"],
        "--eval.dataset", assets["eval"], "--data.prompt_key", "prompt", "--data.max_len", 64,
        "--train.micro_batch_size", 4, "--train.batch_size", 8, "--train.max_epochs", 2, "--adam.lr", "5e-3",
        "--lr_warmup_ratio", 0, "--ds.attn_implementation", "eager", "--ds.zero_stage", 0,
        "--ds.param_dtype", "bf16", "--ckpt.output_dir", root / "rm", "--ckpt.path", root / "ckpt",
    ], root)  # fmt: skip
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in scoring_rows()))
    return SimpleNamespace(root=root, rm=root / "rm", base=assets["model"], pairs=pairs)


def score_flags(s, out, extra=()):
    return ["--model", s.rm, "--data.dataset", s.pairs, "--data.prompt_key", "prompt", "--data.max_len", MAX_LEN,
            "--batch_size", 4, "--checkpoint_every", 2, "--ref_model", s.base, "--output", out, *extra]


@pytest.fixture(scope="module")
def scored(setup):
    out = setup.root / "single" / "scored.jsonl"
    res = run("po_plugins.cli.score_margins", score_flags(setup, out), setup.root)
    assert "wrote 24 rows" in res.stderr
    return out


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


# --------------------------------------------------------------------------------------------------- fast
def test_margin_key_margin_is_refused():
    from po_plugins.cli.score_margins import main

    with pytest.raises(SystemExit, match="must not be 'margin'.*margin-loss target"):
        main(["--model", "x", "--data.dataset", "y.jsonl", "--output", "z.jsonl", "--margin_key", "margin"])


def test_plan_batches_bucket_by_length_and_cover_every_item():
    from po_plugins.cli.score_margins import plan_batches

    lengths = [5, 9, 1, 9, 3, 7, 2]
    batches = plan_batches(lengths, 3)
    assert batches == [[1, 3, 5], [0, 4, 6], [2]]
    assert plan_batches(lengths, 3, bucket=False) == [[0, 1, 2], [3, 4, 5], [6]]


# ---------------------------------------------------------------------------------------------------- e2e
@needs_host
@pytest.mark.e2e
def test_output_keeps_rows_order_and_columns(setup, scored):
    rows, out = read_jsonl(setup.pairs), read_jsonl(scored)
    assert len(out) == len(rows) == 24
    for r, o in zip(rows, out):
        assert list(o) == [*r, "rm_margin", *REF_COLS]
        assert {k: o[k] for k in r} == r
        assert isinstance(o["rm_margin"], float)
        if r["id"] == "long-prompt":  # DPO formatting drops it (prompt >= max_len - 2 tokens); the RM scores it
            assert o["ref_chosen_logp"] is None and o["ref_rejected_logp"] is None
        else:
            assert o["ref_chosen_logp"] < 0 and o["ref_rejected_logp"] < 0
    assert not list(scored.parent.glob("*.partial*")) and not list(scored.parent.glob("*.tmp-*"))


def _fake_strategy():
    data = SimpleNamespace(prompt_key="prompt", chosen_key="chosen", rejected_key="rejected",
                           apply_chat_template=False, tokenizer_chat_template=None)
    return SimpleNamespace(args=SimpleNamespace(data=data), print=print, is_rank_0=lambda: True)


@needs_host
@pytest.mark.e2e
def test_margins_and_ref_logps_equal_one_pair_at_a_time(setup, scored):
    """Independent of the scorer's code: upstream dataset items, one pair per forward, plain HF for the reference."""
    from po_plugins._cpu import apply_cpu_shims

    apply_cpu_shims()
    import torch
    from datasets import Dataset
    from openrlhf.datasets import RewardDataset
    from openrlhf.models import get_llm_for_sequence_regression
    from openrlhf.utils import get_tokenizer
    from transformers import AutoModelForCausalLM

    rows, out = read_jsonl(setup.pairs), read_jsonl(scored)
    rm = get_llm_for_sequence_regression(str(setup.rm), "reward", param_dtype="bf16", attn_implementation="eager")
    rm = rm.float().eval()
    tok = get_tokenizer(str(setup.rm), rm, "left", None)
    ds = RewardDataset(Dataset.from_list(rows), tok, MAX_LEN, _fake_strategy(), is_dpo=False, num_processors=1)
    assert len(ds) == len(rows)
    with torch.no_grad():
        margins = []
        for i in range(len(ds)):
            c_ids, c_mask, r_ids, r_mask, _ = ds[i]
            margins.append((rm(c_ids, attention_mask=c_mask) - rm(r_ids, attention_mask=r_mask)).item())
    got = [o["rm_margin"] for o in out]
    assert max(abs(a - b) for a, b in zip(got, margins)) < 1e-4
    assert max(abs(m) for m in margins) > 1e-2  # a trained RM, not a constant
    lengths = [ds[i][0].shape[-1] for i in range(len(ds))]
    assert lengths != sorted(lengths) and lengths != sorted(lengths, reverse=True)  # bucketing reorders

    # the reference in bf16, as training's reference forward runs it (--ref_dtype bf16 = --ds.param_dtype)
    ref = AutoModelForCausalLM.from_pretrained(str(setup.base), torch_dtype=torch.bfloat16).eval()
    ref_tok = get_tokenizer(str(setup.base), ref, "right", None)
    with torch.no_grad():
        for row, o in zip(rows, out):
            one = RewardDataset(Dataset.from_list([row]), ref_tok, MAX_LEN, _fake_strategy(), is_dpo=True,
                                num_processors=1)
            if len(one) == 0:
                assert row["id"] == "long-prompt" and o["ref_chosen_logp"] is None
                continue
            c_ids, _, r_ids, _, prompt_len = one[0]
            for ids, key in ((c_ids[0], "ref_chosen_logp"), (r_ids[0], "ref_rejected_logp")):
                logp = torch.log_softmax(ref(ids[None]).logits[0, :-1].float(), -1)
                token_logp = logp.gather(-1, ids[1:, None])[:, 0]
                # bf16 GEMMs over a padded batch round differently from one sequence alone: 1e-4 relative
                want = token_logp[prompt_len - 1:].sum().item()
                assert abs(want - o[key]) < 1e-3 + 1e-4 * abs(want), (row["id"], key)


@needs_host
@pytest.mark.e2e
def test_two_processes_write_the_same_file(setup, scored):
    out = setup.root / "two" / "scored.jsonl"
    run("po_plugins.cli.score_margins", score_flags(setup, out), setup.root, nproc=2)
    assert out.read_bytes() == scored.read_bytes()
    assert not list(out.parent.glob("*.partial*"))


@needs_host
@pytest.mark.e2e
def test_resume_after_interruption_is_byte_identical(setup, scored):
    out = setup.root / "resume" / "scored.jsonl"
    res = run("po_plugins.cli.score_margins", score_flags(setup, out), setup.root,
              env_extra={"PO_PLUGINS_SCORE_STOP_AFTER": "3"}, check=False)
    assert res.returncode == 3, res.stderr[-3000:]
    assert not out.exists()
    partial = Path(f"{out}.partial.jsonl")
    assert len(partial.read_text().splitlines()) == 1 + 2 * 4  # header + two checkpointed batches of 4
    res = run("po_plugins.cli.score_margins", score_flags(setup, out, ["--resume"]), setup.root)
    assert "resuming: 8 of 24 rows" in res.stderr
    assert out.read_bytes() == scored.read_bytes()
    assert not partial.exists()


@needs_host
@pytest.mark.e2e
def test_parquet_output_and_bad_inputs_in_process(setup, scored, tmp_path):
    import torch
    from datasets import load_dataset
    from safetensors.torch import load_file, save_file

    from po_plugins.cli.score_margins import main

    base = ["--model", setup.rm, "--data.dataset", setup.pairs, "--data.prompt_key", "prompt",
            "--data.max_len", MAX_LEN, "--batch_size", 4]
    base = list(map(str, base))
    main(base + ["--output", str(tmp_path / "s.parquet")])
    pq = load_dataset("parquet", data_files=str(tmp_path / "s.parquet"))["train"]
    assert pq["id"] == [o["id"] for o in read_jsonl(scored)]
    assert max(abs(a - o["rm_margin"]) for a, o in zip(pq["rm_margin"], read_jsonl(scored))) < 1e-5

    with pytest.raises(SystemExit, match=r"no column 'answer_a' \(set --data.chosen_key"):
        main(base + ["--data.chosen_key", "answer_a", "--output", str(tmp_path / "x.jsonl")])

    bad = tmp_path / "nan_rm"
    shutil.copytree(setup.rm, bad)
    weights = load_file(bad / "model.safetensors")
    weights["score.weight"] = torch.full_like(weights["score.weight"], float("nan"))
    save_file(weights, bad / "model.safetensors", metadata={"format": "pt"})
    nan_args = [a if a != str(setup.rm) else str(bad) for a in base]
    with pytest.raises(SystemExit, match=r"non-finite reward .* 24 pair\(s\).* input rows \(0-based\): "
                                         r"\[0, 1, 2, 3, 4, 5, 6, 7, 8, 9\] \.\.\."):
        main(nan_args + ["--batch_size", "32", "--output", str(tmp_path / "n.jsonl")])
    assert not (tmp_path / "n.jsonl").exists()


@needs_host
@pytest.mark.e2e
def test_benchmark_quick_prints_json_last(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "score_margins.py"), "--quick"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                              "TOKENIZERS_PARALLELISM": "false"})
    assert res.returncode == 0, res.stderr[-4000:]
    result = json.loads(res.stdout.strip().splitlines()[-1])
    assert set(result) == {"batched_pairs_per_s", "single_pairs_per_s", "speedup"}
    assert result["batched_pairs_per_s"] > 0 and result["single_pairs_per_s"] > 0 and result["speedup"] > 0


# ------------------------------------------------------------------------ TRL / Hugging Face reward models (--rm_kind)
needs_trl = pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="trl not installed (po-plugins[trl])")
TRL_CPU = ["--use_cpu", "true", "--bf16", "false", "--report_to", "none", "--save_strategy", "no"]


def _write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def trl_rm(tmp_path_factory):
    """A reward model trained and saved by TRL's own script (trl.scripts.reward, unmodified), on CPU."""
    root = tmp_path_factory.mktemp("trl_score")
    assets = make_assets(root / "tiny", n_train=16, n_eval=4)
    _write_jsonl(root / "rm_data" / "train.jsonl", pair_rows(16, seed=3))
    run("trl.scripts.reward", ["--model_name_or_path", assets["model"], "--dataset_name", root / "rm_data",
                               "--output_dir", root / "rm", "--per_device_train_batch_size", 4, "--max_steps", 4,
                               "--learning_rate", "5e-3", *TRL_CPU], root)
    return SimpleNamespace(root=root, rm=root / "rm")


def trl_datasets(eos):
    """Three TRL preference formats, lengths varied, an `id` and a nested `meta` column in each."""
    rng = random.Random(11)
    base = pair_rows(10, seed=9)
    for r in base:
        r["chosen"] = " ".join([r["chosen"]] * rng.randint(1, 3))
    explicit = [{"id": f"e{k}", "prompt": r["prompt"] + " ", "chosen": r["chosen"], "rejected": r["rejected"],
                 "meta": {"k": k}} for k, r in enumerate(base)]
    explicit[2]["chosen"] += eos  # TRL does not add a second EOS
    explicit[5]["prompt"] = " ".join(["Tell me about the movie."] * 12)  # longer than --data.max_len
    implicit = [{"id": f"i{k}", "chosen": f"{r['prompt']} {r['chosen']}", "rejected": f"{r['prompt']} {r['rejected']}",
                 "meta": {"k": k}} for k, r in enumerate(base)]
    conversational = [{"id": f"c{k}", "prompt": [{"role": "user", "content": r["prompt"]}],
                       "chosen": [{"role": "assistant", "content": r["chosen"]}],
                       "rejected": [{"role": "assistant", "content": r["rejected"]}], "meta": {"k": k}}
                      for k, r in enumerate(base)]
    return {"explicit": explicit, "implicit": implicit, "conversational": conversational}


def trl_reference_margins(rm_dir, rows, out_dir):
    """Independent of the scorer: TRL's RewardTrainer prepares the rows (its tokenisation), then one forward per
    sequence (no padding) through the model TRL loaded."""
    import torch
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    args = RewardConfig(output_dir=str(out_dir), use_cpu=True, bf16=False, report_to="none", max_length=None)
    trainer = RewardTrainer(model=str(rm_dir), args=args, train_dataset=Dataset.from_list(rows))
    prepared = trainer.train_dataset
    assert len(prepared) == len(rows)  # max_length=None: nothing filtered
    model = trainer.model.float().eval()
    with torch.no_grad():
        def reward(ids):
            return model(input_ids=torch.tensor([ids])).logits[0, 0].item()
        return [reward(c) - reward(r) for c, r in zip(prepared["chosen_ids"], prepared["rejected_ids"])], prepared


def test_rm_kind_detection_from_config(tmp_path):
    from po_plugins.cli.score_margins import detect_rm_kind

    for arch, kind in (("LlamaForSequenceClassification", "hf"), ("Qwen2ForSequenceClassification", "hf"),
                       ("RewardModel", "openrlhf"), ("LlamaForCausalLM", "openrlhf")):
        d = tmp_path / arch
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"architectures": [arch]}))
        assert detect_rm_kind(d) == kind
        assert detect_rm_kind(d, "openrlhf") == "openrlhf"  # an explicit --rm_kind wins
    with pytest.raises(SystemExit, match="no config.json there; give the folder of a trained reward model"):
        detect_rm_kind(tmp_path / "missing")


def test_hf_rm_refuses_openrlhf_only_flags(tmp_path):
    from po_plugins.cli.score_margins import main

    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForSequenceClassification"]}))
    base = ["--model", str(tmp_path), "--data.dataset", "x.jsonl", "--output", str(tmp_path / "o.jsonl")]
    with pytest.raises(SystemExit, match=r"--data.apply_chat_template: OpenRLHF reward-model option, .*TRL / "
                                         r"Hugging Face reward model.*drop it$"):
        main(base + ["--data.apply_chat_template"])
    with pytest.raises(SystemExit, match=r"--data.input_template, --ref_model: OpenRLHF reward-model options.*drop "
                                         r"them \(TRL's DPO stores reference log-probs itself"):
        main(base + ["--data.input_template", "Q: {}", "--ref_model", "sft"])


@needs_trl
@pytest.mark.e2e
@pytest.mark.parametrize("fmt", ["explicit", "implicit", "conversational"])
def test_hf_margins_equal_trl_reward_trainer_text(trl_rm, fmt, tmp_path, capsys):
    """Every row and column kept in order; each margin equals a one-sequence-at-a-time re-score of the ids TRL's own
    RewardTrainer builds for that row (standard with explicit / implicit prompt, conversational)."""
    from transformers import AutoTokenizer

    from po_plugins.cli.score_margins import main

    eos = AutoTokenizer.from_pretrained(str(trl_rm.rm)).eos_token
    rows = trl_datasets(eos)[fmt]
    random.Random(1).shuffle(rows)
    data = _write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "scored.jsonl"
    main(["--model", str(trl_rm.rm), "--data.dataset", str(data), "--output", str(out), "--batch_size", "3",
          "--data.max_len", "48"])
    err = capsys.readouterr().err
    assert "wrote 10 rows" in err
    scored = read_jsonl(out)
    assert [list(o) for o in scored] == [[*r, "rm_margin"] for r in rows]
    assert [{k: o[k] for k in r} for o, r in zip(scored, rows)] == rows
    expect, prepared = trl_reference_margins(trl_rm.rm, rows, tmp_path / "trainer")
    got = [o["rm_margin"] for o in scored]
    assert max(abs(a - b) for a, b in zip(got, expect)) < 1e-4, (got, expect)
    assert max(abs(m) for m in expect) > 1e-3  # a trained RM, not a constant
    lengths = [max(len(c), len(r)) for c, r in zip(prepared["chosen_ids"], prepared["rejected_ids"])]
    assert len(set(lengths)) > 2  # padded batches of different lengths were exercised
    if fmt == "explicit":
        i = next(k for k, r in enumerate(rows) if r["id"] == "e2")
        assert prepared["chosen_ids"][i].count(AutoTokenizer.from_pretrained(str(trl_rm.rm)).eos_token_id) == 1
        assert "1 row(s) are longer than --data.max_len 48 tokens" in err


@needs_trl
@pytest.mark.e2e
def test_hf_scoring_resumes_to_the_same_bytes_from_a_data_folder(trl_rm, tmp_path, monkeypatch):
    """TRL's --dataset_name folder layout (train.jsonl, test.jsonl), a split chosen by --data.dataset_split, and an
    interrupted run resumed: the same file as an uninterrupted one."""
    from po_plugins.cli.score_margins import STOP_ENV, main

    rows = trl_datasets("</s>")["explicit"]
    _write_jsonl(tmp_path / "data" / "train.jsonl", rows[:3])
    _write_jsonl(tmp_path / "data" / "test.jsonl", rows)
    flags = ["--model", str(trl_rm.rm), "--data.dataset", str(tmp_path / "data"), "--data.dataset_split", "test",
             "--batch_size", "2", "--checkpoint_every", "1"]
    main(flags + ["--output", str(tmp_path / "full.jsonl")])
    assert [o["id"] for o in read_jsonl(tmp_path / "full.jsonl")] == [r["id"] for r in rows]
    monkeypatch.setenv(STOP_ENV, "2")
    with pytest.raises(SystemExit) as stop:
        main(flags + ["--output", str(tmp_path / "cut.jsonl")])
    assert stop.value.code == 3
    monkeypatch.delenv(STOP_ENV)
    main(flags + ["--output", str(tmp_path / "cut.jsonl"), "--resume"])
    assert (tmp_path / "cut.jsonl").read_bytes() == (tmp_path / "full.jsonl").read_bytes()


@needs_host
@pytest.mark.e2e
def test_stored_reference_logps_reproduce_the_live_reference(setup, scored, tmp_path):
    """train_dpo with --po.ref_logp_keys on the scored file (no reference forward) against the live reference:
    the same implicit rewards at step 1 (policy = reference) and the same per-step losses."""
    common = ["--model.model_name_or_path", setup.base, "--data.dataset", scored, "--data.prompt_key", "prompt",
              "--data.max_len", MAX_LEN, "--train.micro_batch_size", 2, "--train.batch_size", 4,
              "--train.max_epochs", 1, "--ds.attn_implementation", "eager", "--ds.zero_stage", 0,
              "--ds.param_dtype", "bf16", "--adam.lr", "1e-3", "--lr_warmup_ratio", 0, "--po.monitor"]
    run("po_plugins.cli.train_dpo", ["--loss", "dpo", *common, "--ckpt.output_dir", tmp_path / "live"], tmp_path)
    run("po_plugins.cli.train_dpo", ["--loss", "dpo", *common, "--po.ref_logp_keys",
                                     "ref_chosen_logp,ref_rejected_logp", "--ckpt.output_dir", tmp_path / "stored"],
        tmp_path)
    live, stored = (read_jsonl(tmp_path / d / "po_band.jsonl")[1:] for d in ("live", "stored"))
    assert len(live) == len(stored) > 1
    assert abs(stored[0]["r_w"]) < 2e-3 and abs(stored[0]["r_l"]) < 2e-3  # live: exactly 0
    for a, b in zip(live, stored):
        assert b["loss"] == pytest.approx(a["loss"], abs=1e-4), (a["step"], a["loss"], b["loss"])
