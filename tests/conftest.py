"""tests/vllm needs vLLM (the opt-in `make test-vllm` venv) and tests/llamafactory needs LLaMA-Factory (the
`make test-lf` venv, .venv-lf); the main suite does not even collect them without those packages."""

import importlib.util

collect_ignore = [] if importlib.util.find_spec("vllm") is not None else ["vllm"]
if importlib.util.find_spec("llamafactory") is None:
    collect_ignore.append("llamafactory")
