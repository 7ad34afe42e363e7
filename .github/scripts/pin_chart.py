"""Pin the chart's images by digest for a release (run by .github/workflows/release.yaml).

Rewrites charts/loraplex in place: Chart.yaml's version and appVersion become the release
version, and values.yaml's image, serverImage and engineImage get the registry, tag and
digest that CI pushed (or resolved, for vLLM). Comments and layout are kept: only those lines
change. Standard library only, so it runs on a bare runner; tests/security/test_workflows.py
runs it on a copy of the chart and renders the result with helm.

    python3 .github/scripts/pin_chart.py engine-image CHART_DIR   # prints repository:tag
    python3 .github/scripts/pin_chart.py pin CHART_DIR VERSION REGISTRY \
        OPERATOR_DIGEST SERVER_DIGEST ENGINE_DIGEST
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
VERSION = re.compile(r"^[0-9]+\.[0-9]+\.[0-9]+(-[0-9A-Za-z.-]+)?$")


def set_keys(text: str, block: str | None, values: dict[str, str]) -> str:
    """Set `key: value` lines inside the top-level `block:` (None: top level); every key
    must be found exactly once."""
    out, current, seen = [], None, set()
    for line in text.splitlines(keepends=True):
        if line.strip() and not line[0].isspace() and not line.startswith("#"):
            current = line.split(":", 1)[0]
        indent = "" if block is None else "  "
        for key, value in values.items():
            if current == (block if block is not None else key) and re.match(
                rf"^{indent}{re.escape(key)}:", line
            ):
                line = f"{indent}{key}: {value}\n"
                seen.add(key)
        out.append(line)
    missing = set(values) - seen
    if missing:
        raise SystemExit(f"pin_chart: {sorted(missing)} not found under {block or 'top level'}")
    return "".join(out)


def get_key(text: str, block: str, key: str) -> str:
    """The unquoted value of `key` inside the top-level `block:`."""
    current = None
    for line in text.splitlines():
        if line.strip() and not line[0].isspace() and not line.startswith("#"):
            current = line.split(":", 1)[0]
        if current == block and line.startswith(f"  {key}:"):
            return line.split(":", 1)[1].split("#", 1)[0].strip().strip("'\"")
    raise SystemExit(f"pin_chart: {block}.{key} not found")


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "engine-image":
        values = (Path(argv[1]) / "values.yaml").read_text()
        repository, tag = (get_key(values, "engineImage", k) for k in ("repository", "tag"))
        print(f"{repository}:{tag}")
        return 0
    if len(argv) != 7 or argv[0] != "pin":
        print(__doc__, file=sys.stderr)
        return 2
    chart, version, registry, operator, server, engine = argv[1:]
    if not VERSION.match(version):
        raise SystemExit(f"pin_chart: {version!r} is not a semantic version (tag v1.2.3)")
    for digest in (operator, server, engine):
        if not DIGEST.match(digest):
            raise SystemExit(f"pin_chart: {digest!r} is not a sha256 digest")
    root = Path(chart)
    chart_yaml = root / "Chart.yaml"
    chart_yaml.write_text(
        set_keys(chart_yaml.read_text(), None, {"version": version, "appVersion": f'"{version}"'})
    )
    values = root / "values.yaml"
    text = values.read_text()
    for block, repo, digest in (
        ("image", f"{registry}/operator", operator),
        ("serverImage", f"{registry}/adapter-server", server),
    ):
        text = set_keys(
            text, block, {"repository": repo, "tag": f'"{version}"', "digest": f'"{digest}"'}
        )
    text = set_keys(text, "engineImage", {"digest": f'"{engine}"'})
    values.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
