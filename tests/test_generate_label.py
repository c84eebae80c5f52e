"""On-policy pairs on CPU: po_plugins.cli.generate (HF backend) and po_plugins.cli.label_pairs, tiny models.

Checks: the sampler's distribution (temperature, top-k, top-p, greedy) exactly, and through HF generate on a model;
prompts formatted as OpenRLHF's DPO dataset formats them; every row/column kept in order with n samples each;
samples independent of batching, of n_samples and of an interruption (resume); greedy equals plain HF greedy;
labelling by a reward function and by an OpenRLHF reward model (equal to one-sample-at-a-time scoring); the
pairing rules (best/worst ties, Bradley–Terry frequencies); NaN rewards named by row; the benchmark's --quick run.
vLLM: tests/vllm (make test-vllm).
"""

import importlib.util
import json
import math
import random
import re
import runpy
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from po_plugins.generation import Sampling, sample_seed, sample_tokens
from po_plugins.tiny import make_model

ROOT = Path(__file__).resolve().parents[1]
needs_host = pytest.mark.skipif(
    importlib.util.find_spec("openrlhf") is None or importlib.util.find_spec("deepspeed") is None,
    reason="openrlhf/deepspeed not installed (make test installs them)",
)
TEMPLATE = "Q: {} A:"


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def expected_probs(logits, temperature, top_p=1.0, top_k=0):
    """The documented semantics, written out independently (per-token loop, float64): top-k, renormalise, top-p."""
    p = torch.softmax(logits.double() / temperature, -1)
    order = sorted(range(len(p)), key=lambda t: (-p[t].item(), t))
    if top_k:
        order = order[:top_k]
    total = sum(p[t].item() for t in order)
    keep, mass = [], 0.0
    for t in order:
        if mass / total >= top_p and top_p < 1:
            break
        keep.append(t)
        mass += p[t].item()
    q = torch.zeros_like(p)
    q[keep] = p[keep] / p[keep].sum()
    return q


# ------------------------------------------------------------------------------------------------ fast units
@pytest.mark.parametrize("temperature,top_p,top_k", [(1.0, 1.0, 0), (0.7, 0.8, 0), (1.3, 1.0, 3), (1.0, 0.5, 2)])
def test_sample_tokens_follows_the_documented_distribution(temperature, top_p, top_k):
    logits = torch.tensor([2.0, 1.5, 0.3, 0.3, -1.0, -3.0])
    n = 40000
    u = torch.rand(n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    tok = sample_tokens(logits.expand(n, -1), u, temperature, top_p, top_k)
    freq = torch.bincount(tok, minlength=6).double() / n
    want = expected_probs(logits, temperature, top_p, top_k)
    assert set(tok.unique().tolist()) == set(want.nonzero().flatten().tolist())  # exactly the kept tokens
    assert (freq - want).abs().max() < 0.01, (freq, want)
    # rows are independent: a row's token depends only on its own logits and uniform
    one = sample_tokens(logits[None], u[:1], temperature, top_p, top_k)
    assert one.item() == tok[0].item()


def test_greedy_and_seeds():
    logits = torch.tensor([[0.1, 3.0, 2.9], [5.0, -1.0, 4.0]])
    assert sample_tokens(logits, torch.rand(2), 0.0).tolist() == [1, 0]
    assert sample_seed(0, 3, 1) == sample_seed(0, 3, 1) == 6487665098423707196  # stable across runs/platforms
    seeds = {sample_seed(s, i, j) for s in (0, 1) for i in range(20) for j in range(4)}
    assert len(seeds) == 160 and all(0 <= s < 2**63 for s in seeds)
    with pytest.raises(ValueError, match="top_p"):
        Sampling(top_p=0).check()


def test_ray_engines_get_requests_round_robin_and_results_come_back_in_order():
    from po_plugins.generation import ray_generate

    calls = []

    class Engine:  # the shape of OpenRLHF's RolloutRayActor handle: engine.generate.remote(ids, params)
        def __init__(self, k):
            self.generate = SimpleNamespace(remote=lambda ids, p: calls.append(k) or (k, ids, p))

    out = ray_generate([Engine(0), Engine(1), Engine(2)], [[1], [2], [3], [4]], ["a", "b", "c", "d"],
                       get=lambda refs: list(refs))
    assert calls == [0, 1, 2, 0] and out == [(0, [1], "a"), (1, [2], "b"), (2, [3], "c"), (0, [4], "d")]


def test_pairing_rules():
    from po_plugins.cli.label_pairs import pick_pair, tie_pair

    # best_worst: highest vs lowest; equal rewards go to the lowest sample index
    assert pick_pair(["a", "b", "c", "d"], [1.0, 3.0, 3.0, 1.0], "best_worst", 0, 0) == (1, 0)
    assert pick_pair(["a", "b"], [2.0, 2.0], "best_worst", 0, 0) is None  # no preference
    assert pick_pair(["a", "a"], [1.0, 1.0], "bradley_terry", 0, 0) is None  # one distinct text
    assert tie_pair(["a", "a", "b"]) == (0, 2) and tie_pair(["a", "a"]) == (0, 0)
    # Bradley-Terry: P(0 chosen) = sigmoid(r0 - r1), seeded per (seed, row)
    for r0, r1 in ((1.0, 0.0), (0.0, 0.0), (-2.0, 0.5)):
        wins = sum(pick_pair(["x", "y"], [r0, r1], "bradley_terry", 7, row) == (0, 1) for row in range(4000))
        assert abs(wins / 4000 - 1 / (1 + math.exp(r1 - r0))) < 0.03
    draws = [pick_pair(["x", "y", "z"], [0.0, 1.0, 2.0], "bradley_terry", 3, row) for row in range(50)]
    assert draws == [pick_pair(["x", "y", "z"], [0.0, 1.0, 2.0], "bradley_terry", 3, row) for row in range(50)]
    assert all(c != r for c, r in draws) and len(set(draws)) > 3


# ---------------------------------------------------------------------------------------------- fixtures
def prompt_rows():
    rng = random.Random(3)
    topics = ["movie", "book", "meal", "hotel", "concert", "game", "trip"]
    rows = []
    for k, t in enumerate(topics):
        text = " ".join([f"Tell me about the {t}."] * rng.randint(1, 4))
        rows.append({"id": f"p{k}", "prompt": text, "meta": {"k": k, "tags": ["a", "b"][: k % 3]}})
    return rows


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    model = make_model(root / "model", hidden_size=32, layers=2, heads=4, seed=0)
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in prompt_rows()))
    return SimpleNamespace(root=root, model=model, prompts=prompts)


def gen_flags(t, out, *extra):
    return ["--model", str(t.model), "--data.dataset", str(t.prompts), "--data.input_template", TEMPLATE,
            "--n_samples", "2", "--max_new_tokens", "10", "--temperature", "1.0", "--top_p", "0.95",
            "--seed", "11", "--backend", "hf", "--batch_size", "4", "--checkpoint_every", "1", "--output", str(out),
            *map(str, extra)]


def generate(argv):
    from po_plugins.cli.generate import main

    main(argv)


@pytest.fixture(scope="module")
def generated(tiny):
    out = tiny.root / "cli" / "gen.jsonl"
    generate(gen_flags(tiny, out))  # as a subprocess: tests/test_madpo_pipeline.py (iterative MADPO)
    return out


# ----------------------------------------------------------------------------------------------- generate
@needs_host
def test_format_prompt_is_openrlhf_dpo_formatting(tiny):
    from datasets import Dataset
    from openrlhf.datasets import RewardDataset

    from po_plugins.generation import format_prompt, load_tokenizer

    tok = load_tokenizer(tiny.model)
    chat = [{"prompt": [{"role": "user", "content": "How was the movie?"}],
             "chosen": [{"role": "assistant", "content": "good"}], "rejected": [{"role": "assistant", "content": "x"}]}]
    plain = [{"prompt": "How was the book?", "chosen": "fine", "rejected": "bad"}]
    for rows, template, use_chat in ((chat, None, True), (plain, TEMPLATE, False), (plain, None, False)):
        data = SimpleNamespace(prompt_key="prompt", chosen_key="chosen", rejected_key="rejected",
                               apply_chat_template=use_chat, tokenizer_chat_template=None)
        strategy = SimpleNamespace(args=SimpleNamespace(data=data), print=print, is_rank_0=lambda: True)
        ds = RewardDataset(Dataset.from_list(rows), tok, 128, strategy, input_template=template, is_dpo=True,
                           num_processors=1)
        assert format_prompt(rows[0], tok, "prompt", template, use_chat) == ds.prompts[0]
    assert format_prompt({"q": "Hi"}, tok, "q", None, True).endswith("<|assistant|>\n")  # string -> user turn


@pytest.mark.e2e
def test_generate_keeps_rows_and_is_independent_of_batching_n_and_interruption(tiny, generated, monkeypatch, capsys):
    rows, out = read_jsonl(tiny.prompts), read_jsonl(generated)
    assert [{k: o[k] for k in r} for r, o in zip(rows, out)] == rows and len(out) == len(rows)
    assert all(list(o) == [*rows[0], "samples"] for o in out)
    assert all(len(o["samples"]) == 2 and all(isinstance(s, str) and s for s in o["samples"]) for o in out)
    assert len({s for o in out for s in o["samples"]}) > 10  # sampled, not constant
    assert not list(generated.parent.glob("*.partial*")) and not list(generated.parent.glob("*.tmp-*"))
    d = tiny.root / "inproc"

    generate(gen_flags(tiny, d / "b1.jsonl", "--batch_size", 1))  # other batches: the same samples
    assert (d / "b1.jsonl").read_bytes() == generated.read_bytes()

    monkeypatch.setenv("PO_PLUGINS_GENERATE_STOP_AFTER", "2")  # a crash after 2 of 4 batches
    with pytest.raises(SystemExit) as e:
        generate(gen_flags(tiny, d / "r.jsonl"))
    assert e.value.code == 3 and not (d / "r.jsonl").exists()
    monkeypatch.delenv("PO_PLUGINS_GENERATE_STOP_AFTER")
    capsys.readouterr()
    generate(gen_flags(tiny, d / "r.jsonl", "--resume"))
    assert "resuming: 4 of 14 samples are checkpointed" in capsys.readouterr().err  # batch 1 of 4 units
    assert (d / "r.jsonl").read_bytes() == generated.read_bytes()

    generate(gen_flags(tiny, d / "n3.parquet", "--n_samples", 3))  # more samples keep the first ones
    from datasets import load_dataset

    n3 = load_dataset("parquet", data_files=str(d / "n3.parquet"))["train"]
    assert n3["id"] == [r["id"] for r in rows]
    assert [s[:2] for s in n3["samples"]] == [o["samples"] for o in out]

    with pytest.raises(SystemExit, match="no column 'question'"):
        generate(gen_flags(tiny, d / "x.jsonl", "--data.prompt_key", "question"))


@pytest.mark.e2e
def test_greedy_equals_plain_hf_generate(tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tiny.root / "greedy" / "g.jsonl"
    generate(gen_flags(tiny, out, "--temperature", 0))
    model = AutoModelForCausalLM.from_pretrained(str(tiny.model)).eval()
    tok = AutoTokenizer.from_pretrained(str(tiny.model))
    for o in read_jsonl(out):
        ids = tok(TEMPLATE.format(o["prompt"]), add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            gen = model.generate(ids, do_sample=False, max_new_tokens=10, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
        if tok.eos_token_id in gen:
            gen = gen[:gen.index(tok.eos_token_id)]
        assert o["samples"] == [tok.decode(gen, skip_special_tokens=True)] * 2


def peaky_model(path):
    """A tiny model whose next-token distribution has a few dominant tokens (scaled LM head)."""
    from transformers import AutoModelForCausalLM

    make_model(path, hidden_size=32, layers=1, heads=4, seed=1)
    m = AutoModelForCausalLM.from_pretrained(str(path))
    with torch.no_grad():
        m.lm_head.weight.mul_(60.0)
    m.save_pretrained(str(path))
    return path


def test_hf_backend_samples_the_documented_distribution(tmp_path):
    from po_plugins.generation import HFBackend, load_tokenizer

    path = peaky_model(tmp_path / "peaky")
    tok = load_tokenizer(path)
    backend = HFBackend(path, tok, device="cpu")
    ids = tok("How was the movie?", add_special_tokens=False).input_ids
    with torch.no_grad():
        logits = backend.model(torch.tensor([ids])).logits[0, -1]
    n, s = 3000, Sampling(n_samples=1, temperature=0.8, top_p=0.9, max_new_tokens=1)
    want = expected_probs(logits, s.temperature, s.top_p)
    assert 3 <= int((want > 0).sum()) <= 40, "test model not peaky enough"
    outs = backend.generate([ids] * n, [sample_seed(0, i, 0) for i in range(n)], s)
    tok_ids = torch.tensor([o.token_ids[0] for o in outs])
    freq = torch.bincount(tok_ids, minlength=len(want)).double() / n
    assert set(tok_ids.unique().tolist()) <= set(want.nonzero().flatten().tolist())
    assert 0.5 * (freq - want).abs().sum() < 0.06


# ------------------------------------------------------------------------------------------------- labels
REWARD_MODULE = '''
import math
def reward(prompts, responses):
    assert all(isinstance(p, str) for p in prompts)
    return [sum(map(ord, r)) % 89 / 10 for r in responses]
def constant(prompts, responses):
    return [1.0] * len(responses)
def nan_for_long(prompts, responses):
    return [math.nan if len(p) > 60 else 0.5 * len(r) for p, r in zip(prompts, responses)]
'''


def label(argv):
    from po_plugins.cli.label_pairs import main

    main(list(map(str, argv)))


@pytest.mark.e2e
def test_label_pairs_with_a_reward_function(tiny, generated, tmp_path, monkeypatch):
    (tmp_path / "gold_rewards.py").write_text(REWARD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    rows = read_jsonl(generated)
    gold = lambda r: sum(map(ord, r)) % 89 / 10
    out = tmp_path / "pairs.jsonl"
    label(["--input", generated, "--output", out, "--reward", "fn:gold_rewards:reward", "--batch_size", 3])
    pairs = read_jsonl(out)
    kept = [r for r in rows if gold(r["samples"][0]) != gold(r["samples"][1])]
    assert [p["id"] for p in pairs] == [r["id"] for r in kept]  # rows without a preference dropped, order kept
    for p, r in zip(pairs, kept):
        assert {k: p[k] for k in r} == r  # every input column
        assert p["rewards"] == [gold(s) for s in r["samples"]]
        c, j = p["chosen_sample"], p["rejected_sample"]
        assert p["chosen"] == r["samples"][c] and p["rejected"] == r["samples"][j]
        assert p["chosen_reward"] == max(p["rewards"]) > p["rejected_reward"] == min(p["rewards"])
        assert p["reward_margin"] == p["chosen_reward"] - p["rejected_reward"]

    bt = [tmp_path / f"bt{k}.jsonl" for k in range(2)]
    for path in bt:
        label(["--input", generated, "--output", path, "--reward", "fn:gold_rewards:reward",
               "--pairing", "bradley_terry", "--seed", 5])
    assert bt[0].read_bytes() == bt[1].read_bytes()  # seeded

    label(["--input", generated, "--output", tmp_path / "ties.jsonl", "--reward", "fn:gold_rewards:constant",
           "--ties", "keep"])
    ties = read_jsonl(tmp_path / "ties.jsonl")
    assert len(ties) == len(rows) and all(t["reward_margin"] == 0 and t["chosen_sample"] == 0 for t in ties)
    long = [i for i, r in enumerate(rows) if len(r["prompt"]) > 60]
    assert 0 < len(long) < len(rows)
    with pytest.raises(SystemExit, match=rf"non-finite reward .* input row\(s\) \(0-based\): {re.escape(str(long))}"):
        label(["--input", generated, "--output", tmp_path / "nan.jsonl", "--reward", "fn:gold_rewards:nan_for_long"])
    assert not (tmp_path / "nan.jsonl").exists()
    with pytest.raises(SystemExit, match="rm:RM_DIR or fn:module:function"):
        label(["--input", generated, "--output", tmp_path / "x.jsonl", "--reward", "gold_rewards.reward"])


@needs_host
@pytest.mark.e2e
def test_label_pairs_with_a_reward_model_equals_one_sample_at_a_time(tiny, generated, tmp_path):
    from po_plugins._cpu import apply_cpu_shims

    apply_cpu_shims()
    from datasets import Dataset
    from openrlhf.datasets import RewardDataset
    from openrlhf.models import get_llm_for_sequence_regression
    from transformers import AutoTokenizer

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        rm = get_llm_for_sequence_regression(str(tiny.model), "reward", param_dtype="bf16",
                                             attn_implementation="eager", init_value_head=True)
    rm.config.value_head_prefix = "score"
    rm.save_pretrained(str(tmp_path / "rm"))
    AutoTokenizer.from_pretrained(str(tiny.model)).save_pretrained(str(tmp_path / "rm"))

    out = tmp_path / "pairs.jsonl"
    label(["--input", generated, "--output", out, "--reward", f"rm:{tmp_path / 'rm'}", "--data.input_template",
           TEMPLATE, "--data.max_len", 64, "--batch_size", 2, "--ties", "keep"])
    pairs = read_jsonl(out)
    rm = get_llm_for_sequence_regression(str(tmp_path / "rm"), "reward", param_dtype="bf16",
                                         attn_implementation="eager").float().eval()
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "rm"))
    data = SimpleNamespace(prompt_key="prompt", chosen_key="chosen", rejected_key="rejected",
                           apply_chat_template=False, tokenizer_chat_template=None)
    strategy = SimpleNamespace(args=SimpleNamespace(data=data), print=print, is_rank_0=lambda: True)
    assert [p["id"] for p in pairs] == [r["id"] for r in read_jsonl(generated)]
    for p in pairs:
        for s, r in zip(p["samples"], p["rewards"]):
            one = RewardDataset(Dataset.from_list([{"prompt": p["prompt"], "chosen": s, "rejected": s}]), tok, 64,
                                strategy, input_template=TEMPLATE, num_processors=1)
            ids, mask = one[0][:2]
            with torch.no_grad():
                assert abs(rm(ids, attention_mask=mask).item() - r) < 1e-4
        assert p["chosen_reward"] == max(p["rewards"]) and p["rejected_reward"] == min(p["rewards"])


# ----------------------------------------------------------------------------------------------- benchmark
@pytest.mark.e2e
def test_benchmark_quick_prints_json_last(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["generate.py", "--quick"])
    runpy.run_path(str(ROOT / "benchmarks" / "generate.py"), run_name="__main__")
    lines = capsys.readouterr().out.strip().splitlines()
    result = json.loads(lines[-1])
    assert result["hf_samples_per_s"] > 0 and result["hf_plain_samples_per_s"] > 0
    if importlib.util.find_spec("vllm") is None:
        assert result["vllm_samples_per_s"] is None
        assert any(line.startswith("vllm: skipped") for line in lines)
