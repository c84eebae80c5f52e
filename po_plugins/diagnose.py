"""Check a preference dataset before training: the band at the initial model, and the text its pairs share.

    po-plugins diagnose --model DIR --data FILE.jsonl [--loss dpo] [--apply_chat_template] [--batch 8] ...

For batches of `batch` pairs (the monitor's optimizer step) at the model as it is, with the policy equal to its
reference (the first step of every run): the head statistics of the whole responses (what `--po.shared_prefix keep`
trains on) and of the tokens where chosen and rejected differ (what `detach` trains on), the objective's incentive
ratio, the band's verdict for both, and `shared_frac` (the response tokens a pair's two responses share at their
start). Then one recommendation, grounded in docs/choosing.md. Only transformers and the maths core: no host needed.
The numbers are the monitor's (same closed form, same definitions: docs/monitor.md); a batch here is the first
`batch` rows in file order, not a training run's shuffled one.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import torch

from .band import band_stats
from .errors import DataError, OptionError
from .losses import PairBatch, build, names
from .objective import incentives
from .prefix import shared_prefix_mask
from .scores import score_stats_flat


def read_pairs(path, prompt_key: str, chosen_key: str, rejected_key: str) -> list[dict]:
    """The rows of a JSONL file with their prompt, chosen and rejected fields; one DataError naming the column, the
    file, the row and the flag that sets it for a row that lacks one."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"row {i} of {path} is not JSON ({e.msg})", row=i) from None
            for key, flag in ((prompt_key, "--prompt_key"), (chosen_key, "--chosen_key"),
                              (rejected_key, "--rejected_key")):
                if key not in r:
                    raise DataError(f"row {i} of {path} has no '{key}' column ({flag} names it; columns: "
                                    f"{', '.join(sorted(r))})", row=i, column=key)
            rows.append({"prompt": r[prompt_key], "chosen": r[chosen_key], "rejected": r[rejected_key]})
    if not rows:
        raise DataError(f"{path} holds no rows")
    return rows


def _messages(x, role):
    return x if isinstance(x, list) else [{"role": role, "content": str(x)}]


def encode(tok, row: dict, chat: bool, max_len: int) -> tuple[list[int], list[int], int]:
    """(chosen ids, rejected ids, prompt length): the prompt followed by each response (the chat template when
    `chat`, else plain text and the end-of-sequence token), truncated to `max_len` tokens."""
    if chat:
        p = tok.apply_chat_template(_messages(row["prompt"], "user"), tokenize=False, add_generation_prompt=True)
        texts = [tok.apply_chat_template(_messages(row["prompt"], "user") + _messages(row[k], "assistant"),
                                         tokenize=False).rstrip("\n") for k in ("chosen", "rejected")]
    else:
        p = str(row["prompt"])
        texts = [p + str(row[k]) + " " + (tok.eos_token or "") for k in ("chosen", "rejected")]
    n = len(tok(p, add_special_tokens=False)["input_ids"])
    ids = [tok(t, add_special_tokens=False)["input_ids"][:max_len] for t in texts]
    return ids[0], ids[1], n


@torch.no_grad()
def batch_report(model, head, batch: list[tuple[list[int], list[int], int]], loss, pad: int) -> dict:
    """The band of one batch at the initial model (policy = reference), for the whole responses and for their
    differing tokens, and its shared fraction."""
    B = len(batch)
    rows = [b[0] for b in batch] + [b[1] for b in batch]
    plens = [b[2] for b in batch] * 2
    L = max(map(len, rows))
    ids = torch.full((2 * B, L), pad, dtype=torch.long)
    att = torch.zeros(2 * B, L, dtype=torch.long)
    resp = torch.zeros(2 * B, L, dtype=torch.bool)
    for i, (r, p) in enumerate(zip(rows, plens)):
        ids[i, :len(r)] = torch.tensor(r)
        att[i, :len(r)] = 1
        resp[i, p:len(r)] = True
    cache = {}
    hook = head.register_forward_hook(lambda m, i, o: cache.__setitem__("h", i[0].detach()))
    try:
        logits = model(input_ids=ids, attention_mask=att).logits.float()
    finally:
        hook.remove()
    h = cache["h"][:, :-1].float()
    lab = resp[:, 1:]
    shared = shared_prefix_mask(ids, att, resp, B)[:, 1:]
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    z = (lp * lab).sum(-1)
    n = lab.sum(-1)
    pb = PairBatch(z[:B], z[B:], z[:B].clone(), z[B:].clone(), n[:B], n[B:])
    d_w, d_l = incentives(loss, pb)
    is_chosen = torch.arange(2 * B) < B
    out = {"pairs": B, "tokens_w": float(n[:B].float().mean()), "tokens_l": float(n[B:].float().mean()),
           "shared_frac": float(shared.sum()) / max(1, int(lab.sum())),
           "shared_pairs_frac": float((shared[:B].sum(-1) > 0).float().mean()), "d_w": float(d_w.mean()),
           "d_l": float(d_l.mean())}
    for scope, keep in (("whole", lab), ("differing", lab & ~shared)):
        pos = keep.nonzero(as_tuple=False)
        st = score_stats_flat(h[pos[:, 0], pos[:, 1]], logits[:, :-1][pos[:, 0], pos[:, 1]],
                              ids[:, 1:][pos[:, 0], pos[:, 1]], pos[:, 0], is_chosen)
        band = band_stats(d_w, d_l, st.sw_norm, st.sl_norm, st.sw_dot_sl)
        out[scope] = {"rho": band["rho"], "log_r_star": band["log_r_star"], "log_r": band["log_r"],
                      "lower": band["lower"], "upper": band["upper"], "in_band": bool(band["in_band"]),
                      "edge": band["edge"]}
    return out


def recommend(loss_name: str, shared_frac: float, whole_in: float, ratio_below_one: bool) -> str:
    """One line: what docs/choosing.md recommends for this data."""
    base = loss_name[3:] if loss_name.startswith("rc_") else loss_name
    moves_ratio = loss_name.startswith("rc_") or ratio_below_one
    if shared_frac >= 0.05 and moves_ratio:
        return (f"{shared_frac:.0%} of the response text is shared starts and {loss_name}'s incentive ratio is not 1: "
                "train with --po.shared_prefix guard (a pair's shared start keeps its gradient where the pair pushes "
                "it up, loses it where it would push it down; docs/choosing.md)")
    if shared_frac >= 0.05:
        return (f"{shared_frac:.0%} of the response text is shared starts; {loss_name} (ratio 1) does not push it, "
                f"rc_{base} and length-normalised objectives would: with those add --po.shared_prefix guard "
                "(docs/choosing.md)")
    if whole_in < 0.5 and not loss_name.startswith("rc_"):
        return (f"{loss_name} is out of band in most batches at the initial model: watch the monitor's alarm; "
                f"rc_{base} calibrates the ratio (docs/choosing.md)")
    return f"{loss_name} is in band in most batches and the pairs share little text: train as is (docs/choosing.md)"


def diagnose(model_dir, data, loss: str = "dpo", prompt_key: str = "prompt", chosen_key: str = "chosen",
             rejected_key: str = "rejected", chat: bool = False, batch: int = 8, max_batches: int = 16,
             max_len: int = 1024) -> dict:
    """The report: per batch (`batch_report`), the summary and the recommendation."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if loss not in names():
        from .errors import nearest

        raise OptionError(f"unknown loss '{loss}' (--loss){nearest(loss, names())}; choose one of: "
                          f"{', '.join(names())}")
    base_name = loss[3:] if loss.startswith("rc_") else loss
    objective = build(base_name)
    if not Path(model_dir).exists():
        raise OptionError(f"--model {model_dir}: no such folder (a Hugging Face model folder)")
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    head = model.get_output_embeddings()
    rows = read_pairs(data, prompt_key, chosen_key, rejected_key)
    if chat and not getattr(tok, "chat_template", None):
        raise OptionError(f"--apply_chat_template: {model_dir}'s tokenizer has no chat template")
    enc = [encode(tok, r, chat, max_len) for r in rows]
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    reports = [batch_report(model, head, enc[i:i + batch], objective, pad)
               for i in range(0, len(enc) - batch + 1, batch)][:max_batches]
    if not reports:
        raise DataError(f"{data} has {len(rows)} rows: fewer than one batch of {batch} (--batch)")
    n = len(reports)

    def frac(scope):
        return sum(r[scope]["in_band"] for r in reports) / n

    med = {k: statistics.median(r["whole"][k] for r in reports if r["whole"][k] is not None)
           if any(r["whole"][k] is not None for r in reports) else None for k in ("rho", "log_r_star")}
    shared = sum(r["shared_frac"] for r in reports) / n
    ratio = [r["d_w"] / r["d_l"] for r in reports if r["d_l"] > 0 and r["d_w"] > 0]
    below = bool(ratio) and statistics.median(ratio) < 0.95
    edges = sorted({r["whole"]["edge"] for r in reports if r["whole"]["edge"]})
    summary = {"loss": loss, "objective_at_init": base_name, "batches": n, "pairs": n * batch,
               "in_band_frac_whole": frac("whole"), "in_band_frac_differing": frac("differing"), "edges_whole": edges,
               "rho_median": med["rho"], "log_r_star_median": med["log_r_star"],
               "ratio_median": statistics.median(ratio) if ratio else None, "shared_frac": shared,
               "shared_pairs_frac": sum(r["shared_pairs_frac"] for r in reports) / n}
    summary["recommendation"] = recommend(loss, shared, summary["in_band_frac_whole"], below)
    return {"summary": summary, "batches": reports}


def describe(rep: dict) -> list[str]:
    s = rep["summary"]
    r_star = "n/a" if s["log_r_star_median"] is None else f"{math.exp(s['log_r_star_median']):.2f}"
    lines = [f"[po_plugins] diagnose: {s['pairs']} pairs in {s['batches']} batches of {s['pairs'] // s['batches']}, "
             f"{s['objective_at_init']} at the initial model",
             f"  band of the whole responses (shared_prefix keep): in band {s['in_band_frac_whole']:.0%} of batches"
             + (f", out at the {'/'.join(s['edges_whole'])} edge" if s["edges_whole"] else "")
             + f"; rho median {s['rho_median'] if s['rho_median'] is None else round(s['rho_median'], 3)}, "
             f"r* median {r_star}, incentive ratio median "
             f"{'n/a' if s['ratio_median'] is None else round(s['ratio_median'], 3)}",
             f"  band of the differing tokens (shared_prefix detach): in band {s['in_band_frac_differing']:.0%}",
             f"  shared starts: {s['shared_frac']:.0%} of the response tokens; {s['shared_pairs_frac']:.0%} of the "
             "pairs share some",
             f"  recommendation: {s['recommendation']}"]
    return lines
