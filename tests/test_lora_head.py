"""LoRA on the LM head (PEFT, lm_head among the target modules): the head statistics are those of the effective
weight W + scaling·B·A that the logits come from, not of the frozen base weight (issue 22, finding 2)."""

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="peft not installed")


def test_head_statistics_use_the_adapters_effective_weight(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from po_plugins.hosts import effective_head_weight, head_spec, lora_params
    from po_plugins.scores import score_stats_flat, score_stats_head
    from po_plugins.tiny import make_model

    d = make_model(tmp_path / "m", hidden_size=32, layers=2, heads=4)
    model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                             target_modules=["q_proj", "lm_head"], task_type="CAUSAL_LM"))
    base = model.get_base_model()
    head = base.get_output_embeddings()
    assert len(lora_params(head)) == 2
    torch.manual_seed(0)
    with torch.no_grad():
        for p in lora_params(head):
            p.normal_(0, 0.3)  # a trained, non-zero adapter
    model.eval()
    cache = {}
    hook = head.register_forward_hook(lambda m, i, o: cache.__setitem__("h", i[0].detach()))
    ids = torch.randint(0, 200, (4, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    hook.remove()
    h, lg, y = cache["h"][:, :-1].reshape(-1, 32), logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
    rows = torch.arange(4).repeat_interleave(11)
    is_chosen = torch.tensor([True, True, False, False])
    truth = score_stats_flat(h, lg, y, rows, is_chosen)  # from the logits the log-probs come from
    eff = effective_head_weight(head)
    torch.testing.assert_close(h @ eff.T, lg, rtol=1e-4, atol=1e-5)
    st = score_stats_head(h, eff, y, rows, is_chosen)
    for a, b in zip(st, truth):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    with head_spec(base, head) as spec:  # the monitor's step pass rebuilds the logits with it
        torch.testing.assert_close(spec.weight, eff)
    stale = score_stats_head(h, head.weight, y, rows, is_chosen)  # the base weight alone: other statistics
    assert abs(float(stale.sw_dot_sl) - float(truth.sw_dot_sl)) > 1e-3 * abs(float(truth.sw_dot_sl))
