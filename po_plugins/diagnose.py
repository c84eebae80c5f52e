"""Check a preference dataset before training: the band at the initial model, per objective, and the text its
pairs share.

    po-plugins diagnose --model DIR --dataset FILE.jsonl [--loss dpo,simpo,rc_dpo] [--apply_chat_template]
        [--batch 8] [--train_seed 42] [--dtype bf16] [--json OUT.json] [--plot OUT.png] ...

For batches of `batch` pairs (the monitor's optimizer step) at the model as it is, with the policy equal to its
reference (the first step of every run), one forward per batch gives what every objective shares: the head
statistics of the whole responses (what `--po.shared_prefix keep` trains on) and of the tokens where chosen and
rejected differ (what `detach` trains on), `shared_frac` (the response tokens a pair's two responses share at their
start) and the pairs' length ratio. Each objective then adds only its incentives: its ratio r = d_w/d_l, the band's
verdict for both scopes, and one recommendation grounded in docs/choosing.md. Only transformers and the maths core:
no host needed.

The numbers are the monitor's (same closed form, same definitions: docs/monitor.md). The pairs are encoded as
OpenRLHF's `train_dpo` encodes them (`RewardDataset`: prompt + response, a trailing newline stripped, " " + eos
when the text does not end with eos, truncated to `max_len` with eos as the last token, rows whose prompt has
`max_len` − 2 tokens or more dropped), so with the same `--data.max_len`, `--data.apply_chat_template` and
`--data.input_template` the token ids are the training run's. A batch is `batch` consecutive rows in file order,
or, with `train_seed`, in the order OpenRLHF's sampler draws them with `--train.seed` (its first batch is then the
pairs of the run's first optimizer step, for any number of ranks). `dtype` bf16 reproduces a bf16 run's forward
(OpenRLHF trains in bf16): tests/test_diagnose.py checks the first monitor record of a real run against it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from pathlib import Path

import torch

from .band import band_stats
from .errors import DataError, OptionError, nearest
from .head import head_transform
from .losses import PairBatch, build, get_class, names
from .objective import incentives
from .prefix import shared_prefix_mask
from .scores import ScoreStats, score_stats_flat

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SCOPES = ("whole", "differing")  # --po.shared_prefix keep / detach


def read_pairs(path, prompt_key: str, chosen_key: str, rejected_key: str, margin_key: str | None = None) -> list[dict]:
    """The rows of a JSONL file with their prompt, chosen and rejected fields (and `margin` from `margin_key`); one
    DataError naming the column, the file, the row and the flag that sets it for a row that lacks one."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"row {i} of {path} is not JSON ({e.msg})", row=i) from None
            keys = ((prompt_key, "--prompt_key"), (chosen_key, "--chosen_key"), (rejected_key, "--rejected_key"))
            for key, flag in keys + (((margin_key, "--margin_key"),) if margin_key else ()):
                if key not in r:
                    raise DataError(f"row {i} of {path} has no '{key}' column ({flag} names it; columns: "
                                    f"{', '.join(sorted(r))})", row=i, column=key)
            row = {"prompt": r[prompt_key], "chosen": r[chosen_key], "rejected": r[rejected_key], "row": i}
            if margin_key:
                m = r[margin_key]
                if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m):
                    raise DataError(f"row {i} of {path}: margin '{margin_key}' is {m!r}, not a finite number "
                                    "(--margin_key names the reward-model margin column)", row=i, column=margin_key)
                row["margin"] = float(m)
            rows.append(row)
    if not rows:
        raise DataError(f"{path} holds no rows")
    return rows


def _messages(x, role):
    return x if isinstance(x, list) else [{"role": role, "content": str(x)}]


def encode(tok, row: dict, chat: bool, max_len: int, input_template: str | None = None):
    """(chosen ids, rejected ids, prompt length) exactly as OpenRLHF's `RewardDataset(is_dpo=True)` builds them with
    `--data.max_len max_len`, `--data.apply_chat_template` (`chat`) and `--data.input_template`; None for a row that
    OpenRLHF drops (its prompt has `max_len` − 2 tokens or more).

    With `chat` the prompt is the chat template's generation prompt and each response the template's text after it
    (a plain string prompt or response is taken as one user or assistant message); without, the prompt is the text
    (through `input_template` when given) and the response follows it directly. Then, as OpenRLHF: prompt + response,
    trailing newlines stripped, " " + eos appended unless the text ends with eos, tokenized without special tokens,
    truncated to `max_len` tokens, the last token set to eos."""
    eos = tok.eos_token
    if chat:
        msgs = _messages(row["prompt"], "user")
        prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        responses = [tok.apply_chat_template(msgs + _messages(row[k], "assistant"), tokenize=False)[len(prompt):]
                     for k in ("chosen", "rejected")]
    else:
        for k in ("prompt", "chosen", "rejected"):
            if isinstance(row[k], (list, dict)):
                raise DataError(f"row {row.get('row', '?')}: '{k}' is a list of messages; add --apply_chat_template "
                                "to format it with the tokenizer's chat template", row=row.get("row"))
        prompt = str(row["prompt"])
        if input_template:
            prompt = input_template.format(prompt)
        responses = [str(row["chosen"]), str(row["rejected"])]
    n = len(tok(prompt, add_special_tokens=False, truncation=True, max_length=max_len)["input_ids"])
    if n >= max_len - 2:
        return None
    out = []
    for r in responses:
        text = (prompt + r).rstrip("\n")
        if not text.endswith(eos):
            text += " " + eos
        ids = list(tok(text, add_special_tokens=False, truncation=True, max_length=max_len)["input_ids"])
        ids[-1] = tok.eos_token_id
        out.append(ids)
    return out[0], out[1], n


def train_order(n: int, seed: int) -> list[int]:
    """The order in which OpenRLHF's DistributedSampler (shuffle, `--train.seed seed`, first epoch) draws `n` rows: a
    step of k pairs takes the next k of it, whatever the number of ranks (rank i takes every world-th)."""
    g = torch.Generator()
    g.manual_seed(seed)
    return torch.randperm(n, generator=g).tolist()


@dataclasses.dataclass
class BatchScores:
    """What one forward of a batch gives every objective: summed response log-probs `z` [2B] (chosen rows first),
    response token counts `n` [2B], the head statistics of each scope (`SCOPES`) and the batch's data numbers."""

    pairs: int
    z: torch.Tensor
    n: torch.Tensor
    stats: dict
    info: dict


@torch.no_grad()
def batch_scores(model, head, batch: list[tuple[list[int], list[int], int]], pad: int) -> BatchScores:
    """The batch's forward at the initial model: chosen rows then rejected rows, right-padded, with OpenRLHF's
    position ids; the head statistics of the whole responses and of their differing tokens (the monitor's closed
    form, `score_stats_flat`, with the model's logit scale and soft-cap), z, n and the shared fraction."""
    B = len(batch)
    dev = head.weight.device
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
    ids, att, resp = ids.to(dev), att.to(dev), resp.to(dev)
    pos_ids = (att.cumsum(-1) - 1).masked_fill_(att == 0, 1)
    cache = {}
    hook = head.register_forward_hook(lambda m, i, o: cache.__setitem__("h", i[0].detach()))
    try:
        logits = model(input_ids=ids, attention_mask=att, position_ids=pos_ids).logits
    finally:
        hook.remove()
    lab = resp[:, 1:]
    shared = shared_prefix_mask(ids, att, resp, B)[:, 1:]
    pos = lab.nonzero(as_tuple=False)
    lg = logits[:, :-1][pos[:, 0], pos[:, 1]].float()  # [M, V] the response positions' final logits
    h = cache["h"][:, :-1][pos[:, 0], pos[:, 1]]  # [M, d] the head's input there
    y = ids[:, 1:][pos[:, 0], pos[:, 1]]
    del logits
    cache.clear()
    lp = lg.gather(-1, y[:, None]).squeeze(-1) - torch.logsumexp(lg, -1)
    z = torch.zeros(2 * B, dtype=torch.float32, device=dev).index_add_(0, pos[:, 0], lp)
    n = lab.sum(-1)
    scale, cap = head_transform(model.config)
    is_chosen = torch.arange(2 * B, device=dev) < B
    flat_shared = shared[pos[:, 0], pos[:, 1]]
    stats = {}
    for scope, keep in (("whole", torch.ones_like(flat_shared)), ("differing", ~flat_shared)):
        stats[scope] = ScoreStats(*(t.cpu() for t in score_stats_flat(
            h[keep], lg[keep], y[keep], pos[keep, 0], is_chosen, logit_scale=scale, softcap=cap)))
    nw, nl = n[:B].float(), n[B:].float()
    info = {"pairs": B, "tokens_w": float(nw.mean()), "tokens_l": float(nl.mean()),
            "length_ratios": (nl / nw.clamp(min=1)).tolist(),
            "shared_frac": float(shared.sum()) / max(1, int(lab.sum())),
            "shared_pairs_frac": float((shared[:B].sum(-1) > 0).float().mean())}
    return BatchScores(B, z.cpu(), n.cpu(), stats, info)


def scope_band(d_w, d_l, st: ScoreStats) -> dict:
    """The band's numbers for mean incentives d_w, d_l and head statistics `st` (band_stats, the monitor's keys)."""
    b = band_stats(d_w, d_l, st.sw_norm, st.sl_norm, st.sw_dot_sl)
    return {"rho": b["rho"], "log_r_star": b["log_r_star"], "log_r": b["log_r"], "lower": b["lower"],
            "upper": b["upper"], "slack": b["slack"], "in_band": bool(b["in_band"]), "edge": b["edge"]}


def objective_band(objective, scores: BatchScores, margins: torch.Tensor | None = None) -> dict:
    """One objective on one batch: its incentives at the initial model (policy = reference) and the band's verdict
    of each scope. Only the incentives depend on the objective; the statistics are the batch's."""
    B, z, n = scores.pairs, scores.z, scores.n
    pb = PairBatch(z[:B], z[B:], z[:B].clone(), z[B:].clone(), n[:B], n[B:], margins=margins)
    d_w, d_l = incentives(objective, pb)
    out = {"d_w": float(d_w.mean()), "d_l": float(d_l.mean())}
    for scope in SCOPES:
        out[scope] = scope_band(d_w, d_l, scores.stats[scope])
    return out


def quantiles(xs) -> dict | None:
    """{"median", "q1", "q3"} of the finite values of `xs` (None when there are none)."""
    xs = sorted(x for x in xs if x is not None and math.isfinite(x))
    if not xs:
        return None
    if len(xs) == 1:
        return {"median": xs[0], "q1": xs[0], "q3": xs[0]}
    q1, med, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return {"median": med, "q1": q1, "q3": q3}


def recommend(loss_name: str, shared_frac: float, whole_in: float, ratio: float | None,
              r_star: float | None = None) -> str:
    """One line: what docs/choosing.md recommends for this data. `ratio`: the objective's median incentive ratio
    r = d_w/d_l at the initial model (None: undefined); `r_star`: the median r* of the whole responses, the ratio an
    rc_ objective's calibration moves r to (the band's centre)."""
    base = loss_name[3:] if loss_name.startswith("rc_") else loss_name
    rc = loss_name.startswith("rc_")
    r = r_star if rc and r_star is not None else ratio
    what = f"RC moves r to the band's centre r* = {r:.2f}" if rc and r is not None else \
        f"{loss_name}'s incentive ratio r = d_w/d_l is {r:.2f}" if r is not None else ""
    if shared_frac >= 0.05 and r is not None and r < 0.95:
        if rc:
            return (f"{shared_frac:.0%} of the response text is shared starts and {what}, below 1: that pushes the "
                    f"shared text down in both responses (the binding regime: rc_{base} below {base}); train with "
                    "--po.rc_target nearest (calibrates only the micro-batches outside their band: it kept "
                    f"{base}'s result there), or at least --po.shared_prefix guard (takes back the shared part only; "
                    "docs/choosing.md)")
        return (f"{shared_frac:.0%} of the response text is shared starts and {what}, below 1: that pushes the "
                "shared text down in both responses; train with --po.shared_prefix guard (a pair's shared start keeps "
                "its gradient where the pair pushes it up, loses it where it would push it down; docs/choosing.md)")
    if shared_frac >= 0.05 and r is not None and r > 1.05:
        return (f"{shared_frac:.0%} of the response text is shared starts and {what}, above 1: that pushes the "
                "shared text up in both responses (on the demo's data the chosen responses then rose: "
                "docs/choosing.md); --po.shared_prefix guard keeps that push and drops it on any pair that would "
                "push down: safe to add")
    if shared_frac >= 0.05:
        its = (f"{what}, about 1: it hardly pushes that text" if r is not None
               else f"{loss_name}'s incentive ratio is undefined in most batches (a mean incentive ≤ 0)")
        other = "" if rc else f" (rc_{base}: r* = {r_star:.2f})" if r_star is not None else f" (rc_{base})"
        return (f"{shared_frac:.0%} of the response text is shared starts; {its}; an objective whose ratio is not 1 "
                f"would{other}: with such add --po.shared_prefix guard (docs/choosing.md)")
    if whole_in < 0.5 and not rc:
        return (f"{loss_name} is out of band in most batches at the initial model: watch the monitor's alarm; "
                f"rc_{base} calibrates the ratio, and with --po.rc_target nearest it was never worse than {base} in "
                "the regimes measured (docs/choosing.md)")
    return f"{loss_name} is in band in most batches and the pairs share little text: train as is (docs/choosing.md)"


def parse_losses(losses) -> list[str]:
    """The objective names of a comma-separated string (or a list), in order, duplicates dropped; an unknown name is
    one OptionError naming the closest and the choices."""
    items = [s.strip() for s in (losses.split(",") if isinstance(losses, str) else losses)]
    if not items or any(not s for s in items):
        raise OptionError(f"--loss {losses!r}: an empty name; give one or more of: {', '.join(names())}, "
                          "comma-separated (--loss dpo,simpo,rc_dpo)")
    out = []
    for name in items:
        if name not in names():
            raise OptionError(f"unknown loss '{name}' (--loss){nearest(name, names())}; choose one of: "
                              f"{', '.join(names())}")
        if name not in out:
            out.append(name)
    return out


def _objective(name: str, beta: float | None, have_margins: bool):
    base_name = name[3:] if name.startswith("rc_") else name
    hp = {"beta": beta} if beta is not None and "beta" in get_class(base_name).defaults else {}
    try:
        objective = build(base_name, **hp)
    except ValueError as e:
        raise OptionError(f"--beta {beta}: {e}") from None
    if "margins" in objective.needs and not have_margins:
        raise OptionError(f"--loss {name} needs reward-model margins: name their column with --margin_key (e.g. "
                          "rm_margin, written by po-plugins score-margins)")
    return objective


def load(model_dir, dtype: str = "fp32", device: str | None = None, attn_implementation: str = "sdpa"):
    """(tokenizer, model in eval mode on `device`, its LM head) of a Hugging Face folder; one OptionError per bad
    argument."""
    if dtype not in DTYPES:
        raise OptionError(f"--dtype {dtype}: choose one of {', '.join(DTYPES)}")
    if not Path(model_dir).exists():
        raise OptionError(f"--model {model_dir}: no such folder (a Hugging Face model folder)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise OptionError(f"--device {device}: torch sees no CUDA device here; use --device cpu")
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    if tok.eos_token is None:
        raise OptionError(f"--model {model_dir}: its tokenizer has no eos token (OpenRLHF ends every response with "
                          "it); set eos_token in its tokenizer_config.json")
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=DTYPES[dtype],
                                                 attn_implementation=attn_implementation)
    model = model.to(device).eval()
    return tok, model, model.get_output_embeddings()


def diagnose(model_dir, data, loss="dpo", prompt_key: str = "prompt", chosen_key: str = "chosen",
             rejected_key: str = "rejected", chat: bool = False, batch: int = 8, max_batches: int = 16,
             max_len: int = 512, input_template: str | None = None, train_seed: int | None = None,
             dtype: str = "fp32", device: str | None = None, beta: float | None = None,
             margin_key: str | None = None, attn_implementation: str = "sdpa") -> dict:
    """The report of one or more objectives (`loss`: a name, comma-separated names or a list) on the first
    `max_batches` batches of `batch` pairs: one forward per batch (`batch_scores`), reused by every objective
    (`objective_band`); the dataset's numbers once, each objective's summary, batches and recommendation."""
    losses = parse_losses(loss)
    objectives = {name: _objective(name, beta, margin_key is not None) for name in losses}
    if batch < 1 or max_batches < 1:
        raise OptionError(f"--batch {batch} --max_batches {max_batches}: both must be at least 1")
    if max_len < 4:
        raise OptionError(f"--max_len {max_len}: OpenRLHF needs at least 4 tokens (a prompt below max_len − 2)")
    rows = read_pairs(data, prompt_key, chosen_key, rejected_key, margin_key)
    tok, model, head = load(model_dir, dtype, device, attn_implementation)
    if chat and not getattr(tok, "chat_template", None):
        raise OptionError(f"--apply_chat_template: {model_dir}'s tokenizer has no chat template")
    enc = [(r, encode(tok, r, chat, max_len, input_template)) for r in rows]
    kept = [(r, e) for r, e in enc if e is not None]
    dropped = len(rows) - len(kept)
    if train_seed is not None:
        kept = [kept[i] for i in train_order(len(kept), train_seed)]
    n_batches = min(max_batches, len(kept) // batch)
    if n_batches == 0:
        raise DataError(f"{data} has {len(kept)} usable rows ({dropped} dropped: prompt of max_len − 2 tokens or "
                        f"more, --max_len {max_len}): fewer than one batch of {batch} (--batch)")
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    per_batch, per_obj = [], {name: [] for name in losses}
    for k in range(n_batches):
        part = kept[k * batch:(k + 1) * batch]
        sc = batch_scores(model, head, [e for _, e in part], pad)
        margins = torch.tensor([r["margin"] for r, _ in part]) if margin_key else None
        for name, obj in objectives.items():
            per_obj[name].append(objective_band(obj, sc, margins))
        entry = {"rows": [r["row"] for r, _ in part], **{k2: v for k2, v in sc.info.items() if k2 != "length_ratios"},
                 "length_ratio": statistics.median(sc.info["length_ratios"])}
        for scope in SCOPES:
            st = sc.stats[scope]
            b = scope_band(1.0, 1.0, st)
            entry[scope] = {"sw_norm": float(st.sw_norm), "sl_norm": float(st.sl_norm),
                            "sw_dot_sl": float(st.sw_dot_sl), "rho": b["rho"], "log_r_star": b["log_r_star"]}
        entry["_ratios"] = sc.info["length_ratios"]
        per_batch.append(entry)
    ratios = [x for e in per_batch for x in e.pop("_ratios")]
    n = len(per_batch)
    shared = sum(e["shared_frac"] for e in per_batch) / n
    tied = head.weight is getattr(model.get_input_embeddings(), "weight", None)
    rep = {"model": str(model_dir), "data": str(data), "dtype": dtype, "device": str(head.weight.device),
           "encoding": {"apply_chat_template": bool(chat), "max_len": max_len, "input_template": input_template,
                        "train_seed": train_seed},
           "band_params": "the LM head's weight (its use by the head" + (", tied to the input embeddings)" if tied
                                                                          else ")"),
           "rows": len(rows), "dropped_rows": dropped, "batch": batch, "batches": n, "pairs": n * batch,
           "shared_frac": shared, "shared_pairs_frac": sum(e["shared_pairs_frac"] for e in per_batch) / n,
           "length_ratio": quantiles(ratios),
           "tokens_w_mean": statistics.fmean(e["tokens_w"] for e in per_batch),
           "tokens_l_mean": statistics.fmean(e["tokens_l"] for e in per_batch),
           "rho": {s: quantiles(e[s]["rho"] for e in per_batch) for s in SCOPES},
           "r_star": {s: quantiles(math.exp(e[s]["log_r_star"]) for e in per_batch
                                   if e[s]["log_r_star"] is not None) for s in SCOPES},
           "objectives": {}, "per_batch": per_batch}
    for name, bands in per_obj.items():
        ratio = [b["d_w"] / b["d_l"] for b in bands if b["d_l"] > 0 and b["d_w"] > 0]
        s = {"loss": name, "objective_at_init": objectives[name].name, "hparams": dict(objectives[name].hparams),
             "calibrated": name.startswith("rc_")}
        for scope in SCOPES:
            s[f"in_band_frac_{scope}"] = sum(b[scope]["in_band"] for b in bands) / n
            edges = [b[scope]["edge"] for b in bands if b[scope]["edge"]]
            s[f"edges_{scope}"] = {e: edges.count(e) for e in sorted(set(edges))}
        q_rho, q_star = rep["rho"]["whole"], quantiles(b["whole"]["log_r_star"] for b in bands)
        s.update({"rho_median": q_rho and q_rho["median"], "log_r_star_median": q_star and q_star["median"],
                  "ratio_median": statistics.median(ratio) if ratio else None, "ratio": quantiles(ratio),
                  "undefined_ratio_batches": n - len(ratio)})
        r_star = rep["r_star"]["whole"]
        s["recommendation"] = recommend(name, shared, s["in_band_frac_whole"], s["ratio_median"],
                                        r_star and r_star["median"])
        s["batches"] = bands
        rep["objectives"][name] = s
    return rep


def _q(q: dict | None, fmt: str = ".3f") -> str:
    return "n/a" if q is None else f"{q['median']:{fmt}} [{q['q1']:{fmt}}, {q['q3']:{fmt}}]"


def _edges(e: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in e.items()) or "-"


def describe(rep: dict) -> list[str]:
    """The printed report: the dataset's lines, one row per objective, one recommendation per objective."""
    n = rep["batches"]
    enc = rep["encoding"]
    lines = [f"[po_plugins] diagnose: {rep['pairs']} pairs in {n} batches of {rep['batch']} at the initial model "
             f"({rep['dtype']}, {rep['device']}; OpenRLHF's encoding, max_len {enc['max_len']}"
             + (", chat template" if enc["apply_chat_template"] else "")
             + (f", rows in --train.seed {enc['train_seed']}'s order" if enc["train_seed"] is not None
                else ", rows in file order")
             + (f"; {rep['dropped_rows']} rows dropped: prompt too long" if rep["dropped_rows"] else "") + ")",
             f"  pairs: shared starts {rep['shared_frac']:.0%} of the response tokens ({rep['shared_pairs_frac']:.0%} "
             f"of the pairs share some); length ratio |y_l|/|y_w| {_q(rep['length_ratio'], '.2f')} (median [IQR]); "
             f"tokens chosen / rejected {rep['tokens_w_mean']:.0f} / {rep['tokens_l_mean']:.0f}",
             f"  head scores, the same for every objective: whole responses (shared_prefix keep) rho "
             f"{_q(rep['rho']['whole'])}, r* {_q(rep['r_star']['whole'])}; differing tokens (detach) rho "
             f"{_q(rep['rho']['differing'])}, r* {_q(rep['r_star']['differing'])}"]
    rows = [("objective", "in band keep", "edge keep", "in band detach", "edge detach", "r = d_w/d_l [IQR]")]
    for name, s in rep["objectives"].items():
        label = name + (f" (r of {s['objective_at_init']}, before RC)" if s["calibrated"] else "")
        und = f", {s['undefined_ratio_batches']} undefined" if s["undefined_ratio_batches"] else ""
        rows.append((label, f"{round(s['in_band_frac_whole'] * n)}/{n}", _edges(s["edges_whole"]),
                     f"{round(s['in_band_frac_differing'] * n)}/{n}", _edges(s["edges_differing"]),
                     _q(s["ratio"]) + und))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines += [f"  {name}: {s['recommendation']}" for name, s in rep["objectives"].items()]
    return lines


def band_points(rep: dict, scope: str = "whole") -> dict[str, list[tuple[float, float]]]:
    """Each objective's batches as (log r* − log r, ρ) in `scope` (batches without a ratio or a ρ left out)."""
    out = {}
    for name, s in rep["objectives"].items():
        label = name + (f" (r of {s['objective_at_init']}, before RC)" if s["calibrated"] else "")
        out[label] = [(b[scope]["log_r_star"] - b[scope]["log_r"], b[scope]["rho"]) for b in s["batches"]
                      if b[scope]["log_r"] is not None and b[scope]["rho"] is not None]
    return out


def plot_band(panels: list[tuple[str, dict[str, list[tuple[float, float]]]]], path, title: str,
              region: str = "in band: |log r* − log r| ≤ −log ρ",
              xlabel: str = "log r* − log r = log(‖s_l‖/‖s_w‖) − log(d_w/d_l) (batch)") -> Path:
    """The picture of docs/img/band_regimes.png, for any incentive ratio: each batch a point (log r* − log r, ρ), one
    marker per series; a ratio r is in band iff |log r* − log r| ≤ −log ρ (the shaded region; everywhere for ρ ≤ 0).
    Right of it the lower edge is crossed (the chosen log-likelihood is predicted to fall), left of it the upper one
    (the rejected one to rise). One panel per (subtitle, {series: points}); written to `path` (PNG)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise OptionError("the picture needs matplotlib: pip install matplotlib (or --plot none: no picture)") from None
    path = Path(path)
    fig = Figure(figsize=(7.5 * len(panels) + 2, 5))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    rho = [i / 200 for i in range(1, 201)]
    markers = "os^vDP*Xph<>"
    for ax, (sub, points) in zip(axes, panels):
        xs = [x for pts in points.values() for x, _ in pts]
        ys = [y for pts in points.values() for _, y in pts]
        lim = max([1.2] + [abs(x) * 1.1 for x in xs])
        lo = min([-0.1] + [y - 0.05 for y in ys])
        ax.fill_betweenx(rho, [math.log(r) for r in rho], [-math.log(r) for r in rho], color="tab:green",
                         alpha=0.12, label=region)
        ax.axhspan(lo, 0.0, color="tab:green", alpha=0.12)  # ρ ≤ 0: every ratio is in band
        for i, ((name, pts), m) in enumerate(zip(points.items(), markers * 4)):  # hollow, shrinking: overlaps show
            ax.scatter([x for x, _ in pts], [y for _, y in pts], marker=m, s=max(16, 40 - 6 * i), alpha=0.9,
                       facecolors="none", edgecolors=f"C{i % 10}", label=f"{name} ({len(pts)})")
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(lo, 1.0)
        ax.set_xlabel(xlabel + "\n← upper edge: rejected predicted to rise  |  lower edge: chosen predicted to "
                      "fall →", fontsize=9)
        ax.set_ylabel("ρ = cos(s_w, s_l) (batch)")
        ax.set_title(sub, fontsize=9)
        if ax is axes[-1]:  # one legend: the series are the same in every panel
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def plot(rep: dict, path) -> Path:
    """diagnose's picture: every objective's batches against its band, whole responses (keep) and differing tokens
    (detach) side by side."""
    model = Path(rep["model"]).name
    title = (f"{model} on {Path(rep['data']).name}: {rep['batches']} batches of {rep['batch']} pairs at the initial "
             f"model ({rep['dtype']})")
    return plot_band([("whole responses (--po.shared_prefix keep)", band_points(rep, "whole")),
                      ("differing tokens (--po.shared_prefix detach)", band_points(rep, "differing"))], path, title)
