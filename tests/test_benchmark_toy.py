"""benchmarks/toy_band.py --quick: runs, writes its PNGs, and its last line is the headline JSON."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_toy_band_quick_prints_json_last(tmp_path):
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "toy_band.py"), "--quick", "--out", str(tmp_path)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    result = json.loads(res.stdout.strip().splitlines()[-1])
    expected = {"mode", "n_toys", "lr_small", "lr_large", "sign_acc_w_small_lr", "sign_acc_l_small_lr",
                "sign_acc_both_small_lr", "band_iff_acc_small_lr", "sign_acc_both_large_lr", "band_iff_acc_large_lr",
                "sign_acc_both_by_lr", "nonfinite_runs", "seconds"}
    for loss in ("dpo", "rc_dpo", "bce", "rc_bce", "simpo", "rc_simpo", "cpo", "rc_cpo"):
        expected |= {f"{loss}_in_band_frac", f"{loss}_dz_w", f"{loss}_dz_w_displacement_toys", f"{loss}_margin"}
    assert expected <= set(result), sorted(expected - set(result))
    assert result["mode"] == "quick" and result["lr_small"] < result["lr_large"]
    # at a small step size the band's gradient-flow prediction matches the realised discrete step
    assert result["sign_acc_both_small_lr"] >= 0.95
    assert result["band_iff_acc_small_lr"] >= 0.95
    # reward calibration keeps the run in the band, where DPO on the displacement toys is not
    assert result["rc_dpo_in_band_frac"] > result["dpo_in_band_frac"]
    assert result["rc_dpo_dz_w_displacement_toys"] > 0 > result["dpo_dz_w_displacement_toys"]
    for name in ("toy_trajectories.png", "toy_sign_accuracy.png"):
        png = tmp_path / "img" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
