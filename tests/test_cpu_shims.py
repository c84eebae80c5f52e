"""Unit tests for the CPU shims: the pure-torch flash_attn stand-in and apply_cpu_shims()."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import po_plugins._cpu as cpu

STAND_IN = Path(cpu.__file__).resolve().parent / "flash_attn"


def _load(rel: str, name: str):
    """Load a stand-in module by file path, without putting the stand-in on sys.path."""
    spec = importlib.util.spec_from_file_location(name, STAND_IN / rel)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


bp = _load("bert_padding.py", "_po_test_bert_padding")

# batch 2, seqlen 3, one feature: values 1..6; row 0 has 2 real tokens, row 1 has 1.
HIDDEN = torch.arange(1.0, 7.0).reshape(2, 3, 1)
MASK = torch.tensor([[1, 1, 0], [1, 0, 0]])


def test_unpad_input_matches_hand_computed():
    x, indices, cu_seqlens, max_seqlen, seqused = bp.unpad_input(HIDDEN, MASK)
    assert x.tolist() == [[1.0], [2.0], [4.0]]
    assert indices.tolist() == [0, 1, 3]
    assert cu_seqlens.tolist() == [0, 2, 3] and cu_seqlens.dtype == torch.int32
    assert max_seqlen == 2 and isinstance(max_seqlen, int)
    assert seqused.tolist() == [2, 1] and seqused.dtype == torch.int32


def test_unpad_input_with_unused_mask_keeps_allocated_tokens():
    unused = torch.tensor([[0, 0, 1], [0, 0, 0]])
    x, indices, cu_seqlens, max_seqlen, seqused = bp.unpad_input(HIDDEN, MASK, unused)
    assert x.squeeze(-1).tolist() == [1.0, 2.0, 3.0, 4.0]
    assert indices.tolist() == [0, 1, 2, 3]
    assert cu_seqlens.tolist() == [0, 3, 4]
    assert max_seqlen == 3
    assert seqused.tolist() == [2, 1]  # only attention_mask tokens count as used


def test_unpad_then_pad_round_trip_zeroes_padding():
    x, indices, *_ = bp.unpad_input(HIDDEN, MASK)
    out = bp.pad_input(x, indices, batch=2, seqlen=3)
    assert out.shape == (2, 3, 1)
    assert out.squeeze(-1).tolist() == [[1.0, 2.0, 0.0], [4.0, 0.0, 0.0]]
    assert torch.equal(out, HIDDEN * MASK.unsqueeze(-1))


def test_round_trip_with_multi_dim_features_and_bool_mask():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3, 4, 2, 5, generator=g)
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    x, indices, cu_seqlens, max_seqlen, _ = bp.unpad_input(h, mask)
    assert x.shape == (7, 2, 5)
    assert cu_seqlens.tolist() == [0, 3, 3, 7] and max_seqlen == 4
    assert torch.equal(bp.pad_input(x, indices, 3, 4), h * mask[..., None, None])


def test_index_first_axis_selects_rows_and_scatters_grad():
    src = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], requires_grad=True)
    out = bp.index_first_axis(src, torch.tensor([2, 0, 2]))
    assert out.tolist() == [[5.0, 6.0], [1.0, 2.0], [5.0, 6.0]]
    out.sum().backward()
    assert src.grad.tolist() == [[1.0, 1.0], [0.0, 0.0], [2.0, 2.0]]  # repeated index accumulates


def test_index_first_axis_rejects_1d_input():
    with pytest.raises(AssertionError):
        bp.index_first_axis(torch.arange(3.0), torch.tensor([0]))


def test_pad_input_grad_gathers_written_rows():
    vals = torch.tensor([[1.0], [2.0]], requires_grad=True)
    out = bp.pad_input(vals, torch.tensor([1, 4]), batch=2, seqlen=3)
    assert out.squeeze(-1).tolist() == [[0.0, 1.0, 0.0], [0.0, 2.0, 0.0]]
    (out * torch.arange(6.0).reshape(2, 3, 1)).sum().backward()
    assert vals.grad.tolist() == [[1.0], [4.0]]


def test_rearrange_is_einops():
    import einops

    assert bp.rearrange is einops.rearrange


def test_with_torch_adam_only_touches_adam_dict_configs():
    cfg = {"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
    new = cpu.with_torch_adam(cfg)
    assert new["optimizer"]["params"] == {"lr": 1e-3, "torch_adam": True}
    assert cfg["optimizer"]["params"] == {"lr": 1e-3}  # input not modified
    explicit = {"optimizer": {"type": "Adam", "params": {"torch_adam": False}}}
    assert cpu.with_torch_adam(explicit) is explicit
    lion = {"optimizer": {"type": "Lion", "params": {}}}
    assert cpu.with_torch_adam(lion) is lion
    assert cpu.with_torch_adam("ds_config.json") == "ds_config.json"
    assert cpu.with_torch_adam({"train_batch_size": 4}) == {"train_batch_size": 4}


def _python(code: str, env_update=None, drop=()):
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(env_update or {})
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def test_stand_in_package_has_no_ops():
    code = (
        f"import sys; sys.path.insert(0, {str(STAND_IN.parent)!r})\n"
        "import flash_attn, flash_attn.bert_padding, flash_attn.utils.distributed as d\n"
        "assert flash_attn.PO_PLUGINS_STAND_IN and callable(d.all_gather)\n"
        "try:\n    import flash_attn.ops.triton.cross_entropy\nexcept ImportError:\n    print('NO-OPS')\n"
    )
    res = _python(code)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "NO-OPS"


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU shims are a no-op with CUDA")
def test_apply_cpu_shims_in_fresh_process():
    code = (
        "import json, os, torch\n"
        "from po_plugins._cpu import apply_cpu_shims, ensure_single_process_env\n"
        "env_set = ensure_single_process_env()\n"
        "first, second = apply_cpu_shims(), apply_cpu_shims()\n"
        "import flash_attn, transformers.utils as tu\n"
        "from openrlhf.models.utils import log_probs_from_logits\n"
        "torch.cuda.set_device(0); torch.cuda.synchronize(); torch.cuda.empty_cache()\n"
        "print(json.dumps(dict(env_set=env_set, first=first, second=second,\n"
        "    fa_file=flash_attn.__file__, fa2=tu.is_flash_attn_2_available(),\n"
        "    dev=str(torch.zeros(1).to(torch.cuda.current_device()).device),\n"
        "    env={k: os.environ.get(k) for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR')},\n"
        "    port=int(os.environ['MASTER_PORT']))))\n"
    )
    res = _python(code, drop=DIST_VARS)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["env_set"] and out["first"] and out["second"]
    assert out["fa_file"].startswith(str(STAND_IN))
    assert out["fa2"] is False  # transformers must not offer flash-attention 2
    assert out["dev"] == "cpu"
    assert out["env"] == {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}
    assert 0 < out["port"] < 65536
    assert res.stderr.count("po_plugins: CPU run") == 1  # logged once despite two calls


def test_ensure_single_process_env_leaves_launcher_env_alone():
    code = (
        "import os\nfrom po_plugins._cpu import ensure_single_process_env\n"
        "print(ensure_single_process_env(), os.environ.get('RANK'), os.environ.get('LOCAL_RANK'))\n"
    )
    res = _python(code, env_update={"WORLD_SIZE": "2"}, drop=DIST_VARS)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["False", "None", "None"]
