"""Tiny, offline, deterministic assets for tests and the demo.

* :func:`make_tokenizer` trains a small byte-level BPE tokenizer (``tokenizers``) on a built-in corpus
  and saves it as a ``PreTrainedTokenizerFast`` with bos/eos/pad tokens and a chat template.
* :func:`make_model` saves a randomly initialised tiny ``LlamaForCausalLM`` (safetensors) plus that
  tokenizer in one folder, usable as ``--model.model_name_or_path`` for OpenRLHF's ``train_dpo``
  (Actor, get_tokenizer) and ``train_rm`` (get_llm_for_sequence_regression loads the base model).
* :func:`make_pairs` writes a JSONL preference set (``prompt``, ``chosen``, ``rejected``) whose
  chosen answers use positive words and rejected answers negative words: a learnable signal
  (``kind="sentiment"``, :func:`pair_rows`), or whose rejected answer is the chosen one continued
  (``kind="shared"``, :func:`shared_pair_rows`: shared text, different lengths, as in ``make demo``).
* :func:`make_assets` builds all of it under one root.

Nothing here touches the network; identical arguments give identical files.
"""

import json
import random
from pathlib import Path

BOS, EOS, PAD = "<s>", "</s>", "<pad>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
SPECIAL_TOKENS = [PAD, BOS, EOS, *ROLE_TOKENS]

# One turn per message: "<|role|>\n{content}</s>\n"; the generation prompt opens an assistant turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

TOPICS = ["movie", "book", "meal", "hotel", "concert", "game", "trip", "class", "phone", "show", "park", "song"]
ASPECTS = ["story", "service", "music", "price", "staff", "ending", "design", "pace", "sound", "view"]
POSITIVE = ["great", "wonderful", "excellent", "delightful", "amazing", "lovely", "superb", "fantastic", "good"]
NEGATIVE = ["terrible", "awful", "boring", "dreadful", "horrible", "poor", "bad", "disappointing", "dull"]
PROMPTS = [
    "How was the {t}?",
    "What did you think of the {t}?",
    "Tell me about the {t}.",
    "Give a short review of the {t}.",
    "Describe the {t} in one sentence.",
]
ANSWERS = [
    "The {t} was {a} and the {x} was {b}.",
    "I found the {t} {a}, with a {b} {x}.",
    "It was a {a} {t} and the {x} felt {b}.",
    "Honestly the {t} was {a}; the {x} was {b} too.",
]


def _answer(rng: random.Random, topic: str, words: list) -> str:
    return rng.choice(ANSWERS).format(t=topic, x=rng.choice(ASPECTS), a=rng.choice(words), b=rng.choice(words))


def corpus() -> list:
    """The built-in training corpus for the tokenizer: every template filled with every word once or more."""
    rng = random.Random(1234)
    lines = [p.format(t=t) for p in PROMPTS for t in TOPICS]
    for topic in TOPICS:
        for words in (POSITIVE, NEGATIVE):
            lines += [_answer(rng, topic, words) for _ in range(8)]
    lines += [" ".join(POSITIVE), " ".join(NEGATIVE), " ".join(ASPECTS), "Hello! How are you today? I am fine, thanks."]
    return lines


def make_tokenizer(out_dir, vocab_size: int = 512, texts=None):
    """Train a byte-level BPE tokenizer on ``texts`` (default :func:`corpus`), save it to ``out_dir`` and return it.

    Special tokens: ``<pad>`` (id 0), ``<s>`` (bos, 1), ``</s>`` (eos, 2) and the chat-role markers.
    No post-processor: like Qwen, plain encoding adds no bos; the chat template adds the role markers.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus() if texts is None else list(texts), trainer=trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=ROLE_TOKENS,
        model_max_length=256,
        clean_up_tokenization_spaces=False,
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.save_pretrained(str(out_dir))
    _portable_tokenizer_config(out_dir)
    return hf_tok


def _portable_tokenizer_config(out_dir) -> None:
    """The saved tokenizer loads under transformers 4.5x (LLaMA-Factory's environment) and 5.x alike: the class both
    know (transformers 5 writes its own `TokenizersBackend`) and the role markers under the key both read."""
    import json

    path = Path(out_dir, "tokenizer_config.json")
    cfg = json.loads(path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg.pop("backend", None)
    extra = cfg.pop("extra_special_tokens", None)
    if isinstance(extra, list):
        cfg["additional_special_tokens"] = extra
    path.write_text(json.dumps(cfg, indent=2) + "\n")


def make_model(
    out_dir,
    vocab_size: int = None,
    hidden_size: int = 32,
    layers: int = 2,
    heads: int = 4,
    seed: int = 0,
    tie_word_embeddings: bool = False,
    texts=None,
    tokenizer_vocab: int = 512,
    max_positions: int = 256,
) -> Path:
    """Save a tiny random ``LlamaForCausalLM`` and its tokenizer to ``out_dir``; return the folder.

    ``vocab_size`` defaults to the tokenizer's size (it may be larger, never smaller). The weights
    depend only on the arguments: initialisation runs under ``torch.random.fork_rng`` with ``seed``,
    so the caller's global RNG state is left alone. ``texts`` / ``tokenizer_vocab``: the tokenizer's training
    corpus and size (default: the built-in corpus, 512).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer(out_dir, tokenizer_vocab, texts)
    n_tok = len(tok)
    vocab_size = n_tok if vocab_size is None else vocab_size
    if vocab_size < n_tok:
        raise ValueError(f"vocab_size={vocab_size} is smaller than the tokenizer ({n_tok} tokens)")
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=tie_word_embeddings,
        torch_dtype="float32",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(str(out_dir), safe_serialization=True)
    return out_dir


def pair_rows(n: int, seed: int = 0, with_prompt: bool = True) -> list:
    """``n`` preference rows: ``chosen`` praises, ``rejected`` criticises, with the same topic and template.

    With ``with_prompt=False`` there is no ``prompt`` column and the prompt text is prefixed to both answers.
    """
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        topic = rng.choice(TOPICS)
        prompt = rng.choice(PROMPTS).format(t=topic)
        state = rng.getstate()
        chosen = _answer(rng, topic, POSITIVE)
        rng.setstate(state)  # same template and aspect for both answers: only the sentiment words differ
        rejected = _answer(rng, topic, NEGATIVE)
        if with_prompt:
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        else:
            rows.append({"chosen": f"{prompt} {chosen}", "rejected": f"{prompt} {rejected}"})
    return rows


def shared_pair_rows(n: int, seed: int = 0, extra: int = 2, with_prompt: bool = True) -> list:
    """``n`` preference rows whose ``chosen`` and ``rejected`` share text and differ in length.

    ``chosen`` is one positive sentence about the prompt's topic; ``rejected`` is that same sentence continued by
    ``extra`` more sentences about the same topic with negative words (about ``1 + extra`` times as long). The
    head scores of such pairs are aligned (ρ well above 0) and the rejected one is the larger (r* > 1): DPO's
    incentive ratio r = 1 falls below the band's lower edge and the chosen log-likelihood is pushed down with the
    rejected continuation, which repeats its words.
    """
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        topic = rng.choice(TOPICS)
        prompt = rng.choice(PROMPTS).format(t=topic)
        chosen = _answer(rng, topic, POSITIVE)
        rejected = " ".join([chosen, *(_answer(rng, topic, NEGATIVE) for _ in range(extra))])
        if with_prompt:
            rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
        else:
            rows.append({"chosen": f"{prompt} {chosen}", "rejected": f"{prompt} {rejected}"})
    return rows


PAIR_KINDS = {"sentiment": pair_rows, "shared": shared_pair_rows}


def make_pairs(path, n: int = 64, seed: int = 0, with_prompt: bool = True, kind: str = "sentiment") -> Path:
    """Write :func:`pair_rows` (``kind="sentiment"``) or :func:`shared_pair_rows` (``kind="shared"``) as JSONL to
    ``path`` and return the path."""
    if kind not in PAIR_KINDS:
        raise ValueError(f"kind={kind!r}: one of {sorted(PAIR_KINDS)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in PAIR_KINDS[kind](n, seed=seed, with_prompt=with_prompt):
            f.write(json.dumps(row) + "\n")
    return path


def make_assets(root, n_train: int = 64, n_eval: int = 16, seed: int = 0, kind: str = "sentiment",
                **model_kwargs) -> dict:
    """Build a tiny model folder plus train/eval preference JSONL (``kind``: see :func:`make_pairs`) under ``root``.

    Returns ``{"model": <dir>, "train": <jsonl>, "eval": <jsonl>}`` (``pathlib.Path`` values).
    The eval set uses a different seed so its rows differ from the training rows.
    """
    root = Path(root)
    model_dir = make_model(root / "model", seed=seed, **model_kwargs)
    train = make_pairs(root / "data" / "train.jsonl", n=n_train, seed=seed, kind=kind)
    evals = make_pairs(root / "data" / "eval.jsonl", n=n_eval, seed=seed + 10_000, kind=kind)
    return {"model": model_dir, "train": train, "eval": evals}


DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_module(module: str, args, cwd, nproc: int = 1, env_extra: dict | None = None, timeout: int = 400):
    """Run `python -m module args` (under torchrun when nproc > 1) offline in a fresh process, with no inherited
    launcher variables and a private TORCH_EXTENSIONS_DIR; returns the CompletedProcess (output captured)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", TORCH_EXTENSIONS_DIR=str(Path(cwd) / "ext"))
    env.update(env_extra or {})
    cmd = [sys.executable]
    if nproc > 1:
        cmd += ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(free_port())]
    cmd += ["-m", module, *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
