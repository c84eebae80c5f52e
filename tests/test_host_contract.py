"""The host contract: one options table (`options_for`) that every host honours exactly, the declared seams, and the
host-neutral Plugin driven by a host that is only a few lines (what a new adapter has to provide)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from po_plugins.errors import OptionError
from po_plugins.hosts.base import HostSpec, RunInfo, Seam, check_host
from po_plugins.options import HOSTS, OPTIONS, options_for, parse_plugin_flags

VALUE = {"missing_margin": "unit", "ref_logp_keys": "a,b", "margin_key": "rm_margin", "shared_prefix": "detach",
         "band_scope": "model"}


def raw_value(key):
    kind = OPTIONS[key][0]
    return VALUE.get(key, "true" if kind is bool else "2" if kind is int else "-2" if kind is float else "col")


def foreign(host):
    return [k for k in OPTIONS if k not in options_for(host)]


def test_every_option_is_honoured_by_some_host_and_foreign_ones_exist():
    assert set().union(*(options_for(h) for h in HOSTS)) == set(OPTIONS)
    assert "fused_head" in foreign("llamafactory") and "weight_key" in foreign("openrlhf")


@pytest.mark.parametrize("host", ["openrlhf", "trl"])
def test_command_line_hosts_accept_exactly_their_options(host):
    """The OpenRLHF and TRL command lines (`--po.<name>`) take every option of options_for(host) and refuse every
    other one with one line naming the host that has it."""
    for key in options_for(host):
        _, po, _, _ = parse_plugin_flags(host, [f"--po.{key}", raw_value(key)])
        assert key in po
    for key in foreign(host):
        with pytest.raises(OptionError) as e:
            parse_plugin_flags(host, [f"--po.{key}", raw_value(key)])
        msg = str(e.value)
        assert "\n" not in msg and f"--po.{key} is an option of" in msg and HOSTS[host] + " does not support" in msg
        owners = [h for h in HOSTS if key in options_for(h)]
        assert all(HOSTS[h] in msg for h in owners), msg


def test_trl_config_fields_are_the_trl_options():
    from po_plugins.hosts.trl import PoDPOConfig

    fields = {f.name[3:] for f in dataclasses.fields(PoDPOConfig) if f.name.startswith("po_")}
    assert fields - {"loss", "hparams"} == set(options_for("trl"))


def test_trl_cli_refuses_the_openrlhf_chunked_head_naming_openrlhf():
    from po_plugins.cli.trl_dpo import translate

    with pytest.raises(OptionError, match=r"--po.fused_head is an option of OpenRLHF \(--po.fused_head\) only; TRL"):
        translate(["--loss", "rc_dpo", "--po.fused_head"])
    assert translate(["--loss", "dpo", "--po.weight_key", "w"])[-4:] == ["--po_loss", "dpo", "--po_weight_key", "w"]


def test_unknown_names_suggest_the_nearest():
    with pytest.raises(OptionError, match=r"unknown loss 'rc_simpoo' \(--loss\) \(did you mean 'rc_simpo'\?\)"):
        parse_plugin_flags("openrlhf", ["--loss", "rc_simpoo"])
    with pytest.raises(OptionError, match=r"unknown flag --po.monitr \(did you mean 'monitor'\?\)"):
        parse_plugin_flags("openrlhf", ["--loss", "dpo", "--po.monitr"])
    with pytest.raises(OptionError, match=r"unknown flag --po.gama \(did you mean 'gamma'\?\) for --loss simpo"):
        parse_plugin_flags("trl", ["--loss", "simpo", "--po.gama", "1"])


def test_madpo_without_a_margin_column_is_refused_at_start_on_openrlhf():
    """OpenRLHF resolves the objective when its arguments are parsed (before any model loads)."""
    from types import SimpleNamespace

    from po_plugins.cli.train_dpo import split_argv
    from po_plugins.hosts.openrlhf import make_hierarchize

    po, _ = split_argv(["--loss", "rc_madpo"])
    parsed = SimpleNamespace(model=SimpleNamespace(beta=0.1, label_smoothing=0.0, ipo_enable=False),
                             ds=SimpleNamespace())
    with pytest.raises(OptionError, match=r"loss 'rc_madpo' needs reward-model margins: set --po.margin_key"):
        make_hierarchize(lambda a: a, po)(parsed)
    po, _ = split_argv(["--loss", "rc_madpo", "--po.margin_key", "rm_margin"])
    assert make_hierarchize(lambda a: a, po)(parsed).po.loss == "rc_madpo"


def test_every_adapter_declares_its_host_as_one_spec():
    from po_plugins.hosts import openrlhf, trl

    for mod in (openrlhf, trl):
        assert isinstance(mod.SPEC, HostSpec) and mod.SPEC.key in HOSTS
        assert mod.SPEC.seams and all(isinstance(s, Seam) for s in mod.SPEC.seams)
    assert any(s.attr == "RewardModelTrainer" for s in openrlhf.SPEC.seams)
    assert trl.check_host() == check_host(trl.SPEC)


def test_a_missing_seam_or_version_is_one_host_error():
    from po_plugins.errors import HostError

    spec = HostSpec("Torch", "trl", "torch", "1.0", "99", "test", (Seam("torch", "nn", ("Module",)),))
    assert check_host(spec)
    for bad, text in ((dataclasses.replace(spec, seams=(Seam("torch", "nn", ("NoSuchThing",)),)),
                       "seam torch.nn.NoSuchThing is missing"),
                      (dataclasses.replace(spec, hi="1.1"), r"is not supported by po_plugins \(needs >=1.0,<1.1"),
                      (dataclasses.replace(spec, dist="no-such-dist"), "is not installed")):
        with pytest.raises(HostError, match=text) as e:
            check_host(bad)
        assert "\n" not in str(e.value) and "pip install 'po-plugins[trl]'" in str(e.value)


class ToyHost:
    """A host in a few lines: a one-layer softmax 'model' whose head statistics come from the logits, with the four
    duties of hosts.base.HostAdapter. The Plugin does everything else."""

    def __init__(self, tmp_path, loss, **options):
        from po_plugins.losses import build
        from po_plugins.plugin import Plugin

        torch.manual_seed(0)
        self.W = torch.randn(11, 5, requires_grad=True)
        self.printed = []
        self.po = Plugin(build(loss), {"recheck_every": 0, **options}, self,
                         RunInfo(1, 1, str(tmp_path), lambda n: f"--loss {n}"))

    def po_head_spec(self):  # pragma: no cover - a single micro-batch per step needs no step pass
        raise AssertionError("not used")

    def po_rescore(self, inputs):  # pragma: no cover - recheck_every 0
        raise AssertionError("not used")

    def po_print(self, msg):
        self.printed.append(msg)

    def po_is_rank_0(self):
        return True

    def step(self, h, y, n_pairs, global_step):
        from po_plugins.losses import PairBatch

        logits = h @ self.W.T
        lp = torch.log_softmax(logits, -1).gather(-1, y[:, None]).squeeze(-1)  # one response token per sequence
        rows = torch.arange(h.shape[0])
        training = True
        tokens = self.po.tokens_from_logits(h, logits.detach(), y, rows, h.shape[0], n_pairs) \
            if self.po.scoring(training) else None
        b = PairBatch(lp[:n_pairs], lp[n_pairs:], torch.zeros(n_pairs), torch.zeros(n_pairs),
                      score_stats=self.po.stats_for(tokens))
        per_sample, _, _ = self.po.loss_step(b, training, None, tokens)
        per_sample.mean().backward()
        return self.po.end_step(global_step)


def test_plugin_runs_a_host_of_a_few_lines_and_its_state_round_trips(tmp_path):
    """rc_dpo on the toy host: α moves, the band record is written with the shared keys, the head statistics equal
    autograd on the head weight, and a state_dict restores the identical α sequence."""
    from po_plugins.monitor import JSONL_KEYS

    host = ToyHost(tmp_path, "rc_dpo")
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 5, generator=g), torch.randint(0, 11, (8,), generator=g)) for _ in range(6)]
    logs = [host.step(h, y, 4, i + 1) for i, (h, y) in enumerate(batches[:3])]
    assert logs[-1]["po/alpha"] != 1.0 and "po/rho" in logs[-1]
    h, y = batches[0]
    W = host.W.detach().requires_grad_(True)
    lp = torch.log_softmax(h @ W.T, -1).gather(-1, y[:, None]).squeeze(-1)
    (sw,) = torch.autograd.grad(lp[:4].mean(), [W])
    rec = [json.loads(line) for line in open(tmp_path / "po_band.jsonl")]
    assert "meta" in rec[0] and set(JSONL_KEYS) <= set(rec[1])
    assert rec[1]["sw_norm"] == pytest.approx(float(sw.norm()), rel=1e-5)
    later = [host.step(h, y, 4, i + 4)["po/alpha"] for i, (h, y) in enumerate(batches[3:])]
    first = ToyHost(tmp_path / "a", "rc_dpo")  # the same run, stopped after three steps ...
    for i, (h, y) in enumerate(batches[:3]):
        first.step(h, y, 4, i + 1)
    resumed = ToyHost(tmp_path / "b", "rc_dpo")  # ... and resumed from its state in a fresh plugin
    resumed.po.load_state_dict(json.loads(json.dumps(first.po.state_dict())))
    assert [resumed.step(h, y, 4, i + 4)["po/alpha"] for i, (h, y) in enumerate(batches[3:])] == later
    fresh = ToyHost(tmp_path / "c", "rc_dpo")
    assert [fresh.step(h, y, 4, i + 4)["po/alpha"] for i, (h, y) in enumerate(batches[3:])] != later
    assert host.po.banner().startswith("[po_plugins] loss rc(dpo")


def test_plugin_hint_and_monitor_follow_the_options(tmp_path):
    host = ToyHost(tmp_path, "dpo", monitor=True, alert_steps=1)
    assert host.po.monitor is not None and host.po.monitor.hint == "; consider --loss rc_dpo"
    assert ToyHost(tmp_path, "dpo").po.monitor is None  # no monitor, no statistics, nothing written
    assert ToyHost(tmp_path, "rc_dpo").po.monitor is not None  # calibration always monitors


def test_an_objective_trains_its_own_beta_on_openrlhf_and_trl_unless_set(tmp_path):
    """--loss rc_simpo trains SimPO's β = 2.0 on OpenRLHF and TRL alike unless the user sets the host's β; TRL's own
    loss_type keeps TRL's default 0.1 (LLaMA-Factory: tests/llamafactory)."""
    from types import SimpleNamespace

    from po_plugins.cli.train_dpo import split_argv
    from po_plugins.hosts import openrlhf
    from po_plugins.hosts.trl import PoDPOConfig, resolve_loss
    from po_plugins.losses import build

    def on_openrlhf(argv, beta=0.1):
        po, rest = split_argv(argv)
        name, hp = openrlhf.resolve_loss(po, SimpleNamespace(beta=beta, label_smoothing=0.0, ipo_enable=False))
        return build(name, **hp).hparams["beta"]

    def on_trl(**kw):
        name, hp = resolve_loss(PoDPOConfig(output_dir=str(tmp_path), report_to="none", bf16=False, **kw))
        return build(name, **hp).hparams["beta"]

    assert on_openrlhf(["--loss", "rc_simpo"]) == on_trl(po_loss="rc_simpo") == 2.0
    assert on_openrlhf(["--loss", "rc_simpo", "--model.beta", "0.5"], beta=0.5) == on_trl(po_loss="rc_simpo",
                                                                                           beta=0.5) == 0.5
    assert on_trl(po_monitor=True) == 0.1
    assert PoDPOConfig(output_dir=str(tmp_path), report_to="none", bf16=False).beta == 0.1
