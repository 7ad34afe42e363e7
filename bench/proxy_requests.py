"""The proxy's cost per request (issue 12), beside `bench/proxy_sse.py`'s cost per event.

Same harness, stand-in and load generator as `proxy_sse` (proxy alone on core 0), with short
answers so that the per-request work dominates: 1 token per request unpaced (what one core
answers, and the CPU each request takes) and 16 tokens per request at 256 streams x 50 tok/s
(a GPU's pace, eight times the requests of the 128-token rows). "this" is this checkout and
"compare" is `--compare`'s, measured in one run.

    flock /tmp/loraplex-heavy.lock .venv/bin/python -m bench.proxy_requests --compare /work/main
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bench import proxy_sse

CASES = ((64, 0, 1), (256, 20, 16))  # (streams, ms between tokens, tokens per request)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--bin", type=Path, default=proxy_sse.ROOT / ".cache" / "sse")
    p.add_argument("--seconds", type=float, default=8)
    p.add_argument("--compare", type=Path, required=True)
    args = p.parse_args()
    lines = [
        "| proxy | streams x pace | tokens/request | requests/s via proxy (direct) | "
        "CPU per request | TTFB p50 direct / proxy |",
        "|---|---|---|---|---|---|",
    ]
    for streams, itl, tokens in CASES:
        for label, checkout in (("this", proxy_sse.ROOT), ("compare", args.compare)):
            args.tokens = tokens
            row = proxy_sse.measure(args, checkout, label, 1, streams, itl)
            d, v = row.direct, row.proxy
            per_request = row.proxy_cpu_cores * v["seconds"] / max(v["requests"], 1) * 1e6
            pace = f"{1000 // itl} tok/s" if itl else "unpaced"
            lines.append(
                f"| {label} | {streams} x {pace} | {tokens} | {v['req_s']:,.0f} "
                f"({d['req_s']:,.0f}) | {per_request:.0f} us | "
                f"{d['ttfb_p50_ms']:.1f} / {v['ttfb_p50_ms']:.1f} ms |"
            )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
