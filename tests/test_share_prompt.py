"""--po.share_prompt's pair rows (po_plugins.share) against the stock two-row forward of a real HF model."""

import pytest
import torch

from po_plugins.scores import response_positions
from po_plugins.share import pair_layout

PAD = 0


def model(attn: str, dtype=torch.float32, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=PAD,
                      attn_implementation=attn)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        m = LlamaForCausalLM(cfg)
    return m.to(dtype)


def batch(pairs):
    """OpenRLHF's layout: chosen rows then rejected rows, right-padded; loss mask from each prompt's length."""
    seqs = [p[0] + p[1] for p in pairs] + [p[0] + p[2] for p in pairs]
    plen = [len(p[0]) for p in pairs] * 2
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), PAD, dtype=torch.long)
    att = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        att[i, :len(s)] = 1
    loss = att.clone().bool()
    for r, n in enumerate(plen):
        loss[r, :n] = False
    return ids, att, loss[:, 1:]


# prompt, chosen, rejected (token ids 1..96): a shared prompt; responses sharing their first tokens; an empty prompt;
# a rejected response that is the chosen one's start; equal responses; a one-token response
PAIRS = [
    ([5, 6, 7, 8, 9], [10, 11, 12], [13, 14]),
    ([5, 6, 7], [20, 21, 22, 23, 24], [20, 21, 30]),
    ([], [40, 41, 42], [43, 44, 45, 46]),
    ([50, 51], [52, 53, 54, 55], [52, 53]),
    ([60, 61, 62], [63, 64], [63, 64]),
    ([70], [71], [72, 73, 74, 75, 76, 77]),
]


def stock_logps(m, ids, att, loss):
    pos = att.cumsum(-1) - 1
    pos.masked_fill_(att == 0, 1)
    logits = m(ids, attention_mask=att, position_ids=pos).logits.float()
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
    return lp[loss]  # row-major: the order of response_positions


def shared_logps(m, ids, att, loss, packed):
    lay = pair_layout(ids, att, loss, ids.shape[0] // 2, packed=packed, pad_id=PAD)
    logits = m(lay.input_ids, attention_mask=lay.mask(m.dtype), position_ids=lay.position_ids).logits.float()
    flat = logits.reshape(-1, logits.shape[-1])[lay.src]
    return torch.log_softmax(flat, -1).gather(-1, lay.labels[:, None])[:, 0], lay


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("packed", [False, True])
def test_pair_rows_give_the_stock_log_probs_and_gradients_fp32(attn, packed):
    m = model(attn)
    ids, att, loss = batch(PAIRS)
    w = torch.randn(int(loss.sum()), generator=torch.Generator().manual_seed(1))
    ref = stock_logps(m, ids, att, loss)
    g_ref = torch.autograd.grad((ref * w).sum(), list(m.parameters()))
    got, lay = shared_logps(m, ids, att, loss, packed)
    _, _, y, rows = response_positions(torch.zeros(*ids.shape, 1), None, ids, att, loss)
    assert torch.equal(lay.labels, y) and torch.equal(lay.rows, rows)  # the stock order, token for token
    assert torch.allclose(got, ref, atol=2e-6, rtol=0), (got - ref).abs().max()
    g = torch.autograd.grad((got * w).sum(), list(m.parameters()))
    for a, b in zip(g, g_ref):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5), (a - b).abs().max()
    # the prompt and the shared response starts are counted once: 6 pairs save their common starts
    common = [len(p) + next((i for i, (a, b) in enumerate(zip(c, r)) if a != b), min(len(c), len(r)))
              for p, c, r in PAIRS]
    assert lay.tokens == lay.stock_tokens - sum(common)


def test_pair_rows_bf16_within_the_stated_tolerance():
    """bf16 weights: the same maths with another summation order; log-probs agree to 0.05 nats (bf16 activations
    carry ~3 significant digits: the stock forward run twice in different batch shapes differs by as much)."""
    m = model("sdpa", torch.bfloat16)
    ids, att, loss = batch(PAIRS)
    ref = stock_logps(m, ids, att, loss)
    got, _ = shared_logps(m, ids, att, loss, packed=False)
    assert (got - ref).abs().max() < 0.05
    solo = torch.cat([stock_logps(m, ids[i:i + 1], att[i:i + 1], loss[i:i + 1]) for i in range(ids.shape[0])])
    assert (got - ref).abs().max() <= 4 * max((solo - ref).abs().max(), 1e-3)


def test_mask_sees_exactly_the_stock_keys():
    ids, att, loss = batch(PAIRS[3:4])  # prompt [50, 51], chosen +[52..55], rejected +[52, 53]: all rejected shared
    lay = pair_layout(ids, att, loss, 1)
    assert lay.input_ids[0].tolist() == [50, 51, 52, 53, 54, 55]  # rejected has no rest of its own
    assert lay.segment[0].tolist() == [0, 0, 0, 0, 1, 1]
    ids, att, loss = batch(PAIRS[0:1])
    lay = pair_layout(ids, att, loss, 1)
    assert lay.input_ids[0].tolist() == [5, 6, 7, 8, 9, 10, 11, 12, 13, 14]
    assert lay.position_ids[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 5, 6]
    seen = lay.mask(torch.float32)[0, 0] == 0
    assert seen[8].tolist() == [True] * 5 + [False] * 3 + [True, False]  # rejected's first: prompt and itself
    assert seen[7].tolist() == [True] * 8 + [False] * 2


def test_bad_layouts_are_refused():
    ids, att, loss = batch(PAIRS[:2])
    with pytest.raises(ValueError, match="expected 2 × 3 rows"):
        pair_layout(ids, att, loss, 3)
    gap = att.clone()
    gap[0, 2] = 0
    with pytest.raises(ValueError, match="row 0: the attention mask has a gap"):
        pair_layout(ids, gap, loss, 2)


def test_models_the_block_mask_cannot_serve_are_refused_with_the_fix():
    from transformers import Gemma2Config, LlamaConfig, MistralConfig

    from po_plugins.errors import OptionError
    from po_plugins.hosts.openrlhf import PACKED_FLASH
    from po_plugins.share import check_share

    check_share(LlamaConfig(attn_implementation="sdpa"), max_len=8192)
    check_share(MistralConfig(), max_len=4096)  # its window (4096) is never outgrown
    with pytest.raises(OptionError, match="flash_attention_2 cannot take: use --ds.attn_implementation sdpa"):
        check_share(LlamaConfig(attn_implementation="flash_attention_2"))
    with pytest.raises(OptionError, match="--ds.packing_samples is on: drop it"):
        check_share(LlamaConfig(attn_implementation="flash_attention_2"), flash_hint=PACKED_FLASH)
    with pytest.raises(OptionError, match="set --data.max_len 4096 or less"):
        check_share(Gemma2Config(), max_len=8192)
    cfg = LlamaConfig()
    cfg.layer_types = ["full_attention", "chunked_attention"]
    with pytest.raises(OptionError, match="chunked_attention layers"):
        check_share(cfg)


def test_share_prompt_is_an_openrlhf_option_only():
    from po_plugins.errors import OptionError
    from po_plugins.options import options_for, refuse_option

    assert "share_prompt" in options_for("openrlhf") and "share_prompt" not in options_for("trl")
    with pytest.raises(OptionError, match=r"OpenRLHF \(--po.share_prompt\) only; TRL does not support it"):
        refuse_option("trl", "share_prompt")
