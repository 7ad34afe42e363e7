"""`python -m loraplex.demo` (what `make demo` runs): the chain with a readable narration."""

from __future__ import annotations

import asyncio
import shutil
import signal
import sys
import time

from loraplex.demo.chain import ROOT, run_chain
from loraplex.devtools.bubblewrap import BubblewrapMissing
from loraplex.devtools.kubelet import PodRuleError


def main() -> int:
    workdir = ROOT / ".demo"
    shutil.rmtree(workdir / "pod", ignore_errors=True)
    print("loraplex demo: API stand-in + operator + the rendered pod on CPU vLLM (no GPU needed),")
    print("each container under the pod's rules (bubblewrap: uid, read-only root, volumes, env)")
    print(f"work folder: {workdir} (logs under pod/logs and operator.log)")
    start = time.monotonic()
    # SIGTERM (e.g. `timeout`, a CI runner) cleans up like Ctrl-C: every task's finally runs.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        result = asyncio.run(run_chain(workdir))
    except KeyboardInterrupt:
        print("\ninterrupted: everything started by the demo has been stopped")
        return 130
    except (BubblewrapMissing, PodRuleError) as exc:
        print(f"\nthe pod cannot start here: {exc}", file=sys.stderr)
        return 1
    print("\n==> Timings (seconds)")
    for key, value in result.timings.items():
        print(f"    {key:38s} {value:8.2f}")
    print(f"\ndemo finished in {time.monotonic() - start:.0f}s; all processes stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
