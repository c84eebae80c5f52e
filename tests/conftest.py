"""tests/vllm needs vLLM (the opt-in `make test-vllm` venv); the main suite does not even collect it without vLLM."""

import importlib.util

collect_ignore = [] if importlib.util.find_spec("vllm") is not None else ["vllm"]
