"""The proxy's cost per streamed token, against a compiled GPU-paced vLLM stand-in (issue 12).

One command, one run, side by side: the same load from the compiled load generator straight
to the compiled stand-in ("direct") and through loraplex-server ("proxy"), and for reference
through two floors: `bench/byte_pump.py` (a Python relay without HTTP) and
`bench/relay_floor.c` (a C epoll relay: the kernel's part alone, which no relay in any
language can go below), at 64/256/512 streams x 50 tok/s and unpaced. As the issue measured
it, the proxy gets core 0 alone and the stand-in and load generator share core 1 (with
--workers 2 the proxy gets both cores and the load shares them: the scaling row, contended
by construction on two cores). Proxy CPU is read from /proc/PID/stat of the server and every
process under it.

    flock /tmp/loraplex-heavy.lock .venv/bin/python -m bench.proxy_sse
    (options: --seconds 15 --streams 64,256,512 --workers 1,2 --compare /work/main
     --splice (the C floor by splice(2) as well) --only "this,kernel floor")

Writes bench/results/proxy_sse.json, docs/img/proxy_sse.png and the table in
docs/benchmarks.md (between the `proxy-sse` markers).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SSE_SRC = Path("/work/shared/bench/sse")
CLK_TCK = os.sysconf("SC_CLK_TCK")
MARK_BEGIN = "<!-- proxy-sse:begin -->"
MARK_END = "<!-- proxy-sse:end -->"
FLOOR = Path("byte-pump")  # stands for bench/byte_pump.py where a checkout is expected
# bench/relay_floor.c, built into --bin under these names, with these compiler flags
KERNEL_FLOOR, KERNEL_FLOOR_SPLICE = Path("relay_floor"), Path("relay_floor_splice")
KERNEL_FLOORS = {KERNEL_FLOOR: [], KERNEL_FLOOR_SPLICE: ["-DSPLICE"]}


@dataclass
class Row:
    label: str
    workers: int
    streams: int
    itl_ms: int
    direct: dict[str, float]
    proxy: dict[str, float]
    proxy_cpu_cores: float
    cpu_us_per_event: float
    user_us_per_event: float = 0.0
    sys_us_per_event: float = 0.0


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tree(pid: int) -> list[int]:
    """pid and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (d / "stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def cpu_seconds(pids: list[int]) -> tuple[float, float]:
    """(user, system) CPU seconds of `pids` so far."""
    user = system = 0
    for p in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            user += int(fields[11])
            system += int(fields[12])
    return user / CLK_TCK, system / CLK_TCK


def wait_http(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as r:
            if r.status == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer")


@contextlib.contextmanager
def running(argv: list[str], cpus: str, **kw: object) -> Iterator[subprocess.Popen[bytes]]:
    p = subprocess.Popen(["taskset", "-c", cpus, *argv], **kw)  # type: ignore[call-overload]
    try:
        yield p
    finally:
        p.terminate()
        try:
            p.wait(30)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def loadgen(bindir: Path, url: str, streams: int, tokens: int, seconds: float, cpus: str) -> dict:
    out = subprocess.run(
        [
            "taskset",
            "-c",
            cpus,
            str(bindir / "loadgen"),
            "-c",
            str(streams),
            "-d",
            f"{seconds}s",
            "-n",
            str(tokens),
            "-url",
            url,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    result: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    return result


@contextlib.contextmanager
def byte_pump(upstream: str, cpus: str) -> Iterator[tuple[str, int]]:
    """The floor (`bench/byte_pump.py`): bytes copied both ways, nothing else."""
    port = free_port()
    argv = [sys.executable, "-m", "bench.byte_pump", "--upstream", upstream[7:]]
    with running([*argv, "--port", str(port)], cpus, cwd=ROOT) as p:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/health")
        yield url, p.pid


@contextlib.contextmanager
def relay_floor(binary: Path, upstream: str, cpus: str) -> Iterator[tuple[str, int]]:
    """The kernel's floor (`bench/relay_floor.c`): a C epoll relay, what any relay pays."""
    port = free_port()
    with running([str(binary), str(port), upstream.rsplit(":", 1)[1]], cpus) as p:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/health")
        yield url, p.pid


def build_relay_floors(bindir: Path) -> None:
    """Compiles `bench/relay_floor.c` twice: recv/send, and splice(2) through a pipe."""
    for name, flags in KERNEL_FLOORS.items():
        source = str(ROOT / "bench" / "relay_floor.c")
        cmd = ["cc", "-O2", "-Wall", *flags, "-o", str(bindir / name.name), source]
        subprocess.run(cmd, check=True)


@contextlib.contextmanager
def proxy(
    checkout: Path, upstream: str, workers: int, cpus: str, bindir: Path
) -> Iterator[tuple[str, int]]:
    if checkout == FLOOR:
        with byte_pump(upstream, cpus) as got:
            yield got
        return
    if checkout in KERNEL_FLOORS:
        with relay_floor(bindir / checkout.name, upstream, cpus) as got:
            yield got
        return
    with tempfile.TemporaryDirectory() as tmp:
        w = Path(tmp)
        (w / "manifest.json").write_text(
            json.dumps(
                {
                    "generation": 1,
                    "baseServedName": "base",
                    "maxLoras": 2,
                    "maxLoraRank": 8,
                    "maxCpuLoras": 4,
                    "adapters": [],
                }
            )
        )
        (w / "token").write_text("token")
        port = free_port()
        argv = [
            sys.executable,
            "-m",
            "loraplex_server",
            *("--vllm-url", upstream, "--manifest", str(w / "manifest.json")),
            *("--cache-dir", str(w / "cache"), "--pvc-root", str(w)),
            *("--admin-token-file", str(w / "token"), "--host", "127.0.0.1"),
            *("--port", str(port), "--admin-host", "127.0.0.1"),
            *("--admin-port", str(free_port()), "--log-level", "WARNING"),
        ]
        if workers > 1:
            argv += ["--workers", str(workers)]
        env = {**os.environ, "PYTHONPATH": str(checkout / "images" / "adapter-server")}
        with running(argv, cpus, env=env, stderr=open(w / "server.log", "wb")) as p:
            url = f"http://127.0.0.1:{port}"
            wait_http(f"{url}/readyz")
            yield url, p.pid


def measure(
    args: argparse.Namespace, checkout: Path, label: str, workers: int, streams: int, itl: int
) -> Row:
    bindir: Path = args.bin
    up_port = free_port()
    load_cpus = "1" if workers == 1 else "0,1"
    proxy_cpus = "0" if workers == 1 else "0,1"
    with running(
        [
            str(bindir / "upstream"),
            "-addr",
            f"127.0.0.1:{up_port}",
            "-itl",
            f"{itl}ms",
            "-ttft",
            f"{itl}ms",
        ],
        load_cpus,
    ):
        upstream = f"http://127.0.0.1:{up_port}"
        wait_http(f"{upstream}/health")
        direct = loadgen(
            bindir, f"{upstream}/v1/completions", streams, args.tokens, args.seconds, load_cpus
        )
        with proxy(checkout, upstream, workers, proxy_cpus, bindir) as (url, pid):
            loadgen(bindir, f"{url}/v1/completions", streams, args.tokens, 2, load_cpus)  # warm
            pids = tree(pid)
            u0, s0 = cpu_seconds(pids)
            via = loadgen(
                bindir, f"{url}/v1/completions", streams, args.tokens, args.seconds, load_cpus
            )
            u1, s1 = cpu_seconds(pids)
    user, system = u1 - u0, s1 - s0
    cpu = user + system
    events = max(via["events_s"] * via["seconds"], 1)
    row = Row(
        label=label,
        workers=workers,
        streams=streams,
        itl_ms=itl,
        direct=direct,
        proxy=via,
        proxy_cpu_cores=round(cpu / via["seconds"], 3),
        cpu_us_per_event=round(cpu / events * 1e6, 2),
        user_us_per_event=round(user / events * 1e6, 2),
        sys_us_per_event=round(system / events * 1e6, 2),
    )
    print(json.dumps(asdict(row)), flush=True)
    return row


def table(rows: list[Row]) -> str:
    lines = [
        "| proxy | workers | streams x pace | events/s via proxy (direct) | proxy CPU | CPU/event "
        "(user + kernel) | TTFB p50 direct / proxy | TTFB p99 direct / proxy | errors |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        pace = f"{1000 // r.itl_ms} tok/s" if r.itl_ms else "unpaced"
        d, p = r.direct, r.proxy
        lines.append(
            f"| {r.label} | {r.workers} | {r.streams} x {pace} | {p['events_s']:,.0f} "
            f"({d['events_s']:,.0f}) | {r.proxy_cpu_cores:.2f} core | "
            f"{r.cpu_us_per_event:.1f} us ({r.user_us_per_event:.1f} + {r.sys_us_per_event:.1f})"
            f" | {d['ttfb_p50_ms']:.1f} / {p['ttfb_p50_ms']:.1f} ms | "
            f"{d['ttfb_p99_ms']:.1f} / {p['ttfb_p99_ms']:.1f} ms | {p['errors']:.0f} |"
        )
    return "\n".join(lines)


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for label in dict.fromkeys(r.label for r in rows):
        for workers in sorted({r.workers for r in rows if r.label == label}):
            pts = sorted(
                (r for r in rows if r.label == label and r.workers == workers and r.itl_ms),
                key=lambda r: r.proxy["events_s"],
            )
            if not pts:
                continue
            x = [r.proxy["events_s"] for r in pts]
            name = f"{label}, {workers} worker{'s' if workers > 1 else ''}"
            a.plot(
                x,
                [r.proxy["ttfb_p50_ms"] - r.direct["ttfb_p50_ms"] for r in pts],
                "o-",
                label=f"{name} p50",
            )
            a.plot(
                x,
                [r.proxy["ttfb_p99_ms"] - r.direct["ttfb_p99_ms"] for r in pts],
                "s--",
                label=f"{name} p99",
            )
            b.plot(x, [r.cpu_us_per_event for r in pts], "o-", label=name)
    a.set(xlabel="events/s", ylabel="TTFB overhead, ms (proxy - direct)", yscale="symlog")
    a.axhline(2, color="grey", lw=0.5)
    a.axhline(10, color="grey", lw=0.5)
    b.set(xlabel="events/s", ylabel="proxy CPU per event, us")
    b.axhline(10, color="grey", lw=0.5)
    a.legend(fontsize=7)
    b.legend(fontsize=7)
    fig.suptitle("loraplex-server in front of a GPU-paced stand-in (50 tok/s per stream)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def write_docs(rows: list[Row], cmd: str) -> None:
    doc = ROOT / "docs" / "benchmarks.md"
    text = doc.read_text() if doc.exists() else "# Benchmarks\n"
    block = (
        f"{MARK_BEGIN}\n## Proxy cost per streamed token (`bench/proxy_sse.py`)\n\n"
        f"Command: `{cmd}` ({time.strftime('%Y-%m-%d', time.gmtime())}, 2-core box; proxy "
        "pinned to core 0, stand-in and load generator to core 1; 128 tokens per request; "
        "with 2 workers everything shares both cores). Compiled stand-in and load generator "
        'from `/work/shared/bench/sse`. "this" is this checkout, "floor" is '
        "`bench/byte_pump.py` (bytes copied both ways by a uvloop protocol, no HTTP: the least "
        'a Python relay pays per event here), "kernel floor" is `bench/relay_floor.c` (the '
        "same in C with epoll: the kernel's part alone, the least any relay pays per event "
        'here), "compare" is `--compare`\'s checkout. CPU per event is split into user and '
        "kernel time.\n\n"
        f"{table(rows)}\n\n![TTFB overhead and CPU per event](img/proxy_sse.png)\n{MARK_END}"
    )
    if MARK_BEGIN in text:
        head, rest = text.split(MARK_BEGIN, 1)
        text = head + block + rest.split(MARK_END, 1)[1]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    doc.write_text(text)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--bin", type=Path, default=ROOT / ".cache" / "sse")
    p.add_argument("--seconds", type=float, default=15)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--streams", default="64,256,512")
    p.add_argument("--unpaced-streams", type=int, default=64)
    p.add_argument("--workers", default="1,2")
    p.add_argument("--compare", type=Path, help="another checkout's server, e.g. /work/main")
    p.add_argument("--splice", action="store_true", help="also the kernel floor by splice(2)")
    p.add_argument("--only", help='rows to run, e.g. "this,kernel floor" (default: all)')
    args = p.parse_args()
    if not (args.bin / "loadgen").exists():
        subprocess.run(
            [str(SSE_SRC / "build.sh")], env={**os.environ, "SSE_BIN": str(args.bin)}, check=True
        )
    build_relay_floors(args.bin)
    checkouts = [("this", ROOT), ("floor", FLOOR), ("kernel floor", KERNEL_FLOOR)]
    checkouts += [("kernel floor (splice)", KERNEL_FLOOR_SPLICE)] if args.splice else []
    checkouts += [("compare", args.compare)] if args.compare else []
    if args.only:
        checkouts = [c for c in checkouts if c[0] in args.only.split(",")]
    rows: list[Row] = []
    for label, checkout in checkouts:
        for workers in [int(w) for w in args.workers.split(",")]:
            if workers > 1 and label != "this":
                continue  # one process is the comparison
            streams = [int(s) for s in args.streams.split(",")] if workers == 1 else [256]
            for n in streams:
                rows.append(measure(args, checkout, label, workers, n, 20))
            rows.append(measure(args, checkout, label, workers, args.unpaced_streams, 0))
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "proxy_sse.json").write_text(json.dumps([asdict(r) for r in rows], indent=1))
    plot(rows, ROOT / "docs" / "img" / "proxy_sse.png")
    write_docs(
        rows,
        "flock /tmp/loraplex-heavy.lock .venv/bin/python -m bench.proxy_sse "
        + " ".join(sys.argv[1:]),
    )
    print(table(rows))


if __name__ == "__main__":
    main()
