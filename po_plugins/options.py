"""The plugin's options, shared by every host: names, types, defaults, help and validation (no host imports).

OpenRLHF spells them `--po.<name>`, TRL's `PoDPOConfig` `po_<name>`, a LLaMA-Factory YAML `po_<name>`; the loss is
`--loss` / `po_loss` / `pref_loss` and its hyperparameters go by their papers' names (`--po.gamma 1.0`,
`po_hparams={"gamma": 1.0}`, `po_gamma: 1.0`). `options_for(host)` is the one list of what a host honours.
Every check raises `OptionError` with one line naming the fix; CLIs turn it into a clean exit.
"""

from __future__ import annotations

from typing import Any

from .errors import OptionError, nearest  # noqa: F401  (OptionError: re-exported)

# name -> (type, default, help)
OPTIONS: dict[str, tuple[type, Any, str]] = {
    "monitor": (bool, False, "band monitor (on by default with rc_* losses)"),
    "alert_steps": (int, 20, "warn after this many consecutive out-of-band steps (0: never)"),
    "recheck_every": (int, 10, "every N optimizer steps, re-score the last micro-batch and a fixed probe batch for "
                               "per-pair changes on the same pairs (chosen_up_frac, probe_delta_z_w; two forwards "
                               "each time; 0: never)"),
    "jsonl": (str, None, "band trace path (default <output dir>/po_band.jsonl)"),
    "score_chunk": (int, 4096, "vocabulary chunk of the head score statistics"),
    "score_every": (int, 1, "head score statistics on every k-th micro-batch (RC reuses them in between, counting "
                                 "each scored micro-batch once in its score EMAs; the "
                                 "step's band covers the scored micro-batches)"),
    "margin_key": (str, None, "dataset column with reward-model margins (madpo); never 'margin' on OpenRLHF"),
    "missing_margin": (str, "error", "rows without a margin: 'error' or 'unit' (weight 1)"),
    "ref_logp_keys": (str, None, "CHOSEN,REJECTED columns with stored reference log-probs (score_margins "
                                 "--ref_model): the reference forward is skipped"),
    "fused_head": (bool, False, "chunked LM head: response-token log-probs and head statistics without the "
                                "[N, T, V] logits (docs/results_memory.md)"),
    "share_prompt": (bool, False, "each pair on one row under a block attention mask: its prompt (and the response "
                                  "tokens both answers begin with) computed once, in the policy and the reference; "
                                  "log-probs the stock ones; eager or sdpa attention; the chunked head "
                                  "(docs/share_prompt.md)"),
    "head_chunk": (int, 0, "token positions per chunk of the chunked head (0: about 2^25 logits a chunk)"),
    "probe_alarm_nats": (float, -1.0, "alarm once when the probe pairs' mean chosen log-likelihood (summed over the "
                                      "response) has fallen by this much since the start: measured displacement "
                                      "(docs/monitor.md, 'Alarm'; needs recheck_every > 0)"),
    "probe_alarm_checks": (int, 2, "consecutive re-checks the probe's fall must hold before the alarm fires"),
    "probe_file": (str, None, "held-out preference JSONL (the training set's columns) the monitor re-scores instead "
                              "of the first training micro-batch: probe_delta_*, the alarm and probe_pred_* then "
                              "measure pairs the run never trains on (docs/monitor.md, 'Probe')"),
    "band_scope": (str, "head", "'head' (the band's closed form on the LM head) or 'model': also, every recheck_every "
                                "steps, the band of the step's last micro-batch by autograd over every trainable "
                                "parameter, beside the head's on the same pairs (a forward and two backward passes "
                                "of that micro-batch, two gradient-sized buffers; not under ZeRO-3; docs/monitor.md, "
                                "'Scope')"),
    "weight_key": (str, None, "dataset column of per-row loss weights (each pair's loss times its weight)"),
    "shared_prefix": (str, "keep", "the tokens a pair's two responses share at their start: 'keep' (as the paper), "
                                   "'detach' (a stopped gradient: same loss value, the pair no longer pushes its "
                                   "shared text) or 'guard' (their gradient only when it does not lower the shared "
                                   "text); docs/losses.md, 'Shared prefix'"),
}
# the hosts (their key, as users name them) and how each spells a plugin option
HOSTS = {"openrlhf": "OpenRLHF", "trl": "TRL", "llamafactory": "LLaMA-Factory"}
SPELL = {"openrlhf": "--po.{}", "trl": "po_{}", "llamafactory": "po_{}"}
# options that only some hosts honour: the one table of who honours what (every other option: every host).
# OpenRLHF only: stored reference log-probs (TRL has its own precompute_ref_log_probs, LLaMA-Factory always runs its
# reference forward), the chunked head (TRL has its own fused head) and the shared prompt (TRL's and LLaMA-Factory's
# concatenated forwards build their own batches; docs/share_prompt.md). TRL and LLaMA-Factory only: a per-row weight
# column (OpenRLHF's dataset carries the margin column only). OpenRLHF and TRL only: a held-out probe file (tokenized
# by the trainer's own dataset code; LLaMA-Factory builds its datasets before the trainer, from dataset_info.json).
HOST_ONLY: dict[str, tuple[str, ...]] = {"ref_logp_keys": ("openrlhf",), "fused_head": ("openrlhf",),
                                         "share_prompt": ("openrlhf",), "head_chunk": ("openrlhf",),
                                         "weight_key": ("trl", "llamafactory"),
                                         "probe_file": ("openrlhf", "trl")}


def options_for(host: str) -> list[str]:
    """The plugin options `host` honours, in OPTIONS order."""
    if host not in HOSTS:
        raise OptionError(f"unknown host '{host}'{nearest(host, HOSTS)}; hosts: {', '.join(HOSTS)}")
    return [k for k in OPTIONS if host in HOST_ONLY.get(k, tuple(HOSTS))]


def refuse_option(host: str, key: str, spelled: str | None = None) -> None:
    """One OptionError for an option `host` does not honour: another host's option (naming that host), or an
    unknown one (suggesting the nearest of this host's)."""
    spelled = spelled or SPELL[host].format(key)
    owners = [h for h in HOST_ONLY.get(key, ()) if h != host]
    if key in OPTIONS and owners:
        where = " and ".join(f"{HOSTS[h]} ({SPELL[h].format(key)})" for h in owners)
        raise OptionError(f"{spelled} is an option of {where} only; {HOSTS[host]} does not support it: drop it")
    mine = options_for(host)
    raise OptionError(f"unknown option {spelled}{nearest(key, mine)}; {HOSTS[host]} accepts "
                      f"{', '.join(SPELL[host].format(k) for k in mine)}")


# lower bounds of the integer options
MINIMUM = {"alert_steps": 0, "recheck_every": 0, "score_chunk": 1, "score_every": 1, "head_chunk": 0,
           "probe_alarm_checks": 1}


def check_options(values: dict[str, Any], spell=lambda k: f"--po.{k}") -> None:
    """Validate option values (already typed); `spell` renders an option's name the way the host's user wrote it."""
    for key, low in MINIMUM.items():
        v = values.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < low):
            raise OptionError(f"{spell(key)} must be an integer >= {low}, got {v!r}")
    nats = values.get("probe_alarm_nats")
    if nats is not None and (isinstance(nats, bool) or not isinstance(nats, (int, float)) or not nats <= 0):
        raise OptionError(f"{spell('probe_alarm_nats')} must be a number <= 0 (a fall, in nats per pair), got {nats!r}")
    if values.get("probe_file") and values.get("recheck_every") == 0:
        raise OptionError(f"{spell('probe_file')} is re-scored every {spell('recheck_every')} steps: set "
                          f"{spell('recheck_every')} above 0 or drop {spell('probe_file')}")
    scope = values.get("band_scope", "head")
    if scope not in ("head", "model"):
        raise OptionError(f"{spell('band_scope')} takes 'head' or 'model', got {scope!r}")
    if scope == "model" and values.get("recheck_every") == 0:
        raise OptionError(f"{spell('band_scope')} model is computed every {spell('recheck_every')} steps: set "
                          f"{spell('recheck_every')} above 0")
    sp = values.get("shared_prefix", "keep")
    if sp not in ("keep", "detach", "guard"):
        raise OptionError(f"{spell('shared_prefix')} takes 'keep', 'detach' or 'guard', got {sp!r}")
    mm = values.get("missing_margin", "error")
    if mm not in ("error", "unit"):
        raise OptionError(f"{spell('missing_margin')} takes 'error' or 'unit', got {mm!r}")
    keys = values.get("ref_logp_keys")
    if keys and len(str(keys).split(",")) != 2:
        raise OptionError(f"{spell('ref_logp_keys')} takes two columns: CHOSEN,REJECTED (e.g. "
                          f"ref_chosen_logp,ref_rejected_logp from score_margins --ref_model), got {keys!r}")


def check_loss(name: str | None, hparams: dict[str, Any], loss_flag: str = "--loss",
               hparam_spell=lambda k: f"--po.{k}") -> None:
    """Unknown loss, unknown hyperparameter or invalid value: one OptionError naming the choices."""
    from .losses import accepted_hparams, build, names

    if name is None:
        return
    if name not in names():
        raise OptionError(f"unknown loss '{name}' ({loss_flag}){nearest(name, names())}; choose one of: "
                          f"{', '.join(names())}")
    accepted = accepted_hparams(name)
    unknown = sorted(set(hparams) - set(accepted))
    if unknown:
        hint = nearest(unknown[0], set(accepted) - {"beta"}) if len(unknown) == 1 else ""
        raise OptionError(f"unknown hyperparameter {', '.join(hparam_spell(k) for k in unknown)}{hint} for loss "
                          f"'{name}'; "
                          f"accepted: {', '.join(hparam_spell(k) for k in sorted(set(accepted) - {'beta'})) or 'none'}"
                          + (" (the temperature β is the host's own beta)" if "beta" in accepted else ""))
    try:
        build(name, **hparams)
    except (ValueError, TypeError) as e:
        raise OptionError(f"invalid hyperparameter for loss '{name}': {e}") from None


# how each host's user sets the objective's temperature β
BETA_FLAG = {"openrlhf": "--model.beta", "trl": "--beta", "llamafactory": "pref_beta"}


def parse_plugin_flags(host: str, argv: list[str], default_loss: str | None = None, fill_defaults: bool = True):
    """The plugin's part of a host command line: `--loss NAME` and `--po.<option or hyperparameter> [VALUE]`,
    typed and checked for `host` (its options are `options_for(host)`; another host's option is refused naming
    that host; a hyperparameter is one of the loss's, or of `default_loss` when no --loss is given).

    Returns (loss or None, {option: value} for every option of the host (`fill_defaults=False`: the given ones
    only), {hyperparameter: value}, the host's own arguments in order). Raises OptionError naming the fix."""
    from .losses import accepted_hparams, names

    loss, raw, rest = split_plugin_argv(argv)
    if loss is not None and loss not in names():
        raise OptionError(f"unknown loss '{loss}' (--loss){nearest(loss, names())}; choose one of: "
                          f"{', '.join(names())}")
    mine = options_for(host)
    po = {}
    hp_of = loss or default_loss
    accepted = accepted_hparams(hp_of) if hp_of else {}
    hparams = {}
    for name, (val, flag) in raw.items():
        if name in mine:
            po[name] = parse_value(OPTIONS[name][0], val, flag)
        elif name == "beta":
            raise OptionError(f"the temperature is {BETA_FLAG[host]} (not {flag})")
        elif name in accepted:
            hparams[name] = coerce_hparam(accepted[name], val, flag)
        elif name in OPTIONS:
            refuse_option(host, name, flag)
        elif hp_of is None:
            raise OptionError(f"unknown flag {flag}{nearest(name, mine)}: give --loss NAME for a hyperparameter, or "
                              f"one of {', '.join('--po.' + k for k in mine)}")
        else:
            choices = sorted(set(mine) | set(accepted) - {"beta"})
            raise OptionError(f"unknown flag {flag}{nearest(name, choices)} for --loss {hp_of}; accepted --po.* "
                              f"flags: {', '.join(choices)} (the temperature is {BETA_FLAG[host]})")
    full = {**{k: OPTIONS[k][1] for k in mine}, **po}
    check_options(full)
    check_loss(loss, hparams)  # values too (--po.ema_decay 1.5): one line, before any model is built
    return loss, full if fill_defaults else po, hparams, rest


def split_plugin_argv(argv: list[str]) -> tuple[str | None, dict[str, tuple[str | None, str]], list[str]]:
    """Take `--loss NAME` and `--po.<name> [VALUE]` out of a command line (both `--flag v` and `--flag=v`);
    returns (loss, {name: (raw value or None, flag as written)}, the host's own arguments in order)."""
    loss, raw, rest = None, {}, []
    i = 0
    while i < len(argv):
        a = argv[i]
        key, val = (a.split("=", 1) + [None])[:2] if a.startswith("--") else (a, None)
        if key == "--loss":
            if val is None:
                i += 1
                val = argv[i] if i < len(argv) else None
            if val is None:
                from .losses import names

                raise OptionError("--loss needs a name; choose one of: " + ", ".join(names()))
            loss = val
        elif key.startswith("--po."):
            if val is None and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                val = argv[i + 1]
                i += 1
            raw[key[5:].replace("-", "_")] = (val, key)
        else:
            rest.append(a)
        i += 1
    return loss, raw, rest


def coerce_hparam(default, raw, flag: str):
    """A hyperparameter value from text, typed like its default."""
    if isinstance(default, bool):
        return parse_value(bool, raw, flag)
    if isinstance(default, int):
        return parse_value(int, raw, flag)
    if isinstance(default, float) or default is None:
        try:
            return float(raw)
        except (TypeError, ValueError):
            if default is None:
                return raw
            raise OptionError(f"{flag} takes a number, got {raw!r}") from None
    return raw


def parse_value(kind, raw, flag: str):
    if kind is bool:
        if raw is None or isinstance(raw, bool):
            return True if raw is None else raw
        low = str(raw).lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise OptionError(f"{flag} takes true/false, got {raw!r}")
    if raw is None:
        raise OptionError(f"{flag} needs a value")
    try:
        return kind(raw)
    except (TypeError, ValueError):
        raise OptionError(f"{flag} takes a {kind.__name__}, got {raw!r}") from None
