"""The public API: names, build, errors that name the fix, and the host-free import."""

import subprocess
import sys

import pytest
import torch

from po_plugins import losses
from po_plugins.losses import PairBatch, build

REQUIRED = ["dpo", "cdpo", "robust_dpo", "ipo", "simpo", "cpo", "slic", "hinge", "orpo", "bce", "nca", "apo_zero",
            "apo_down", "sppo_hard", "cal_dpo", "dpop", "exo", "discopop", "lsif", "ukl", "ddro", "r_dpo",
            "beta_dpo", "madpo", "mi_dpo"]


def test_all_required_objectives_and_their_calibrated_forms():
    names = losses.names()
    assert set(REQUIRED) <= set(names)
    for n in REQUIRED:
        cls = losses.get_class(n)
        assert cls.__doc__ and cls.paper and any(k in cls.__doc__ for k in ("arXiv", "20")), n
        assert ("rc_" + n in names) == (cls.incentive_sign != "signed")


def test_unknown_loss_lists_choices():
    with pytest.raises(ValueError) as e:
        build("dpoo")
    assert "dpo" in str(e.value) and "rc_simpo" in str(e.value)


def test_unknown_and_invalid_hparams_name_the_accepted_ones():
    with pytest.raises(ValueError, match="accepted: beta, gamma"):
        build("simpo", gama=1.0)
    with pytest.raises(ValueError, match="ema_decay"):
        build("rc_dpo", bogus=1)
    with pytest.raises(ValueError, match="beta must be a positive"):
        build("dpo", beta=-1)
    with pytest.raises(ValueError, match="label_smoothing"):
        build("robust_dpo", label_smoothing=0.5)
    build("rc_simpo", gamma=0.5, ema_decay=0.9)


@pytest.mark.parametrize("name,field", [("dpo", "ref_chosen"), ("simpo", "chosen_tokens"), ("madpo", "margins"),
                                        ("rc_dpo", "score_stats")])
def test_missing_fields_are_named(name, field):
    b = PairBatch(torch.zeros(2, requires_grad=True), torch.zeros(2, requires_grad=True))
    if field != "ref_chosen":
        b.ref_chosen = b.ref_rejected = torch.zeros(2)
    with pytest.raises(ValueError, match=field):
        build(name)(b)


def test_reference_free_flags():
    assert build("simpo").reference_free and build("cpo").reference_free and build("orpo").reference_free
    assert not build("dpo").reference_free and not build("rc_dpo").reference_free
    assert build("rc_simpo").reference_free


def test_core_and_monitor_import_without_any_host():
    code = ("import sys\n"
            "for host in ('openrlhf', 'flash_attn', 'trl', 'llamafactory'): sys.modules[host] = None\n"
            "import po_plugins, po_plugins.losses, po_plugins.rc, po_plugins.band, po_plugins.scores, "
            "po_plugins.madpo, po_plugins.toy, po_plugins.monitor, po_plugins.options, po_plugins.hosts\n"
            "assert 'deepspeed' not in sys.modules and 'transformers' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
