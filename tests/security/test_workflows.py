"""The GitHub Actions workflows: actionlint-clean, and the release ships what it built.

Matrix: actionlint (with shellcheck on the run: scripts when installed) passes every
workflow, and fails a broken one (control); release.yaml runs only on version tags, with
read-only default permissions and `packages: write` only where it pushes, builds both
Dockerfiles (which exist), pushes, records the digest the build returned, and pushes the chart
to an OCI registry after pinning it; no action is used from a branch. The pinning script,
run here on a copy of the chart and rendered with the real helm, pins all three images
(operator, adapter-server, vLLM) by digest, sets the chart version, and refuses a bad digest
or version.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.chart.conftest import CHART, Helm

pytestmark = [pytest.mark.security, pytest.mark.chart]

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yaml"))
RELEASE = ROOT / ".github" / "workflows" / "release.yaml"
PIN = ROOT / ".github" / "scripts" / "pin_chart.py"
ACTIONLINT = Path(sys.prefix) / "bin" / "actionlint"
DIGESTS = ["sha256:" + c * 64 for c in "abc"]
# The release job's own check: lines that carry a digest-pinned image.
PINNED = re.compile(r"(image: |--(engine|server)-image=).*@sha256:[0-9a-f]{64}")


def actionlint(*files: Path) -> subprocess.CompletedProcess[str]:
    if not ACTIONLINT.is_file():
        pytest.fail(f"actionlint is missing at {ACTIONLINT}: run tests/security/install_tools.sh")
    return subprocess.run(
        [str(ACTIONLINT), "-no-color", *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "HOME": str(ROOT)},
    )


def test_workflows_exist() -> None:
    assert {w.name for w in WORKFLOWS} >= {"release.yaml", "ci.yaml"}


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.name)
def test_actionlint_passes(workflow: Path) -> None:
    result = actionlint(workflow)
    assert result.returncode == 0, result.stdout + result.stderr
    if shutil.which("shellcheck", path="/usr/bin:/bin") is None:
        print("note: shellcheck not installed; run: scripts were not shell-checked")


def test_actionlint_fails_a_broken_workflow(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text(
        "on: push\njobs:\n  x:\n    runs-on: ubuntu-24.04\n    steps:\n"
        "      - run: echo ${{ github.nonexistent_context }}\n        shell: bashh\n"
    )
    result = actionlint(broken)
    assert result.returncode != 0 and "nonexistent_context" in result.stdout


def release() -> dict[Any, Any]:
    doc: dict[Any, Any] = yaml.safe_load(RELEASE.read_text())
    return doc


def steps(job: dict[str, Any]) -> list[dict[str, Any]]:
    return list(job["steps"])


def test_release_runs_on_version_tags_only() -> None:
    wf = release()
    on = wf[True]  # YAML 1.1 reads the key `on` as true
    assert set(on) == {"push"} and set(on["push"]) == {"tags"}
    assert on["push"]["tags"] == ["v[0-9]+.[0-9]+.[0-9]+*"]


def test_release_permissions_are_least() -> None:
    wf = release()
    assert wf["permissions"] == {"contents": "read"}
    for name, job in wf["jobs"].items():
        assert job["permissions"] == {"contents": "read", "packages": "write"}, name
        for step in steps(job):
            if step.get("uses", "").startswith("actions/checkout"):
                assert step["with"]["persist-credentials"] is False


def test_release_builds_both_images_and_records_pushed_digests() -> None:
    images = release()["jobs"]["images"]
    matrix = {m["image"]: m["dockerfile"] for m in images["strategy"]["matrix"]["include"]}
    assert matrix == {
        "operator": "images/operator/Dockerfile",
        "adapter-server": "images/adapter-server/Dockerfile",
    }
    assert all((ROOT / d).is_file() for d in matrix.values())
    [build] = [s for s in steps(images) if s.get("uses", "").startswith("docker/build-push")]
    assert build["with"]["push"] is True and build["with"]["file"] == "${{ matrix.dockerfile }}"
    [record] = [s for s in steps(images) if s.get("name") == "Record the pushed digest"]
    assert record["env"]["DIGEST"] == f"${{{{ steps.{build['id']}.outputs.digest }}}}"


def test_release_pins_then_pushes_the_chart() -> None:
    chart = release()["jobs"]["chart"]
    assert chart["needs"] == "images"
    scripts = [s.get("run", "") for s in steps(chart)]
    pin = next(i for i, s in enumerate(scripts) if "pin_chart.py pin" in s)
    push = next(i for i, s in enumerate(scripts) if "helm push" in s)
    assert pin < push
    assert "digests/operator" in scripts[pin] and "digests/adapter-server" in scripts[pin]
    assert "oci://ghcr.io/" in scripts[push] and "helm package charts/loraplex" in scripts[push]
    # The job's own check uses the same pattern this test checks the script's output with.
    assert PINNED.pattern.replace("\\", "") in scripts[pin].replace("\\", "")


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=lambda p: p.name)
def test_actions_are_versioned(workflow: Path) -> None:
    doc = yaml.safe_load(workflow.read_text())
    for job in doc["jobs"].values():
        for step in job["steps"]:
            if "uses" in step:
                ref = step["uses"].rsplit("@", 1)[-1]
                assert re.fullmatch(r"v\d+(\.\d+)*|[0-9a-f]{40}", ref), step["uses"]


def pin(chart: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(PIN), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=chart.parent,
    )


def test_pinned_chart_runs_only_digests(helm: Helm, tmp_path: Path) -> None:
    chart = tmp_path / "loraplex"
    shutil.copytree(CHART, chart)
    engine = pin(chart, "engine-image", str(chart))
    assert engine.stdout.strip() == "vllm/vllm-openai:v0.32.0"
    result = pin(chart, "pin", str(chart), "1.2.3", "ghcr.io/acme", *DIGESTS)
    assert result.returncode == 0, result.stderr
    meta = yaml.safe_load((chart / "Chart.yaml").read_text())
    assert (meta["version"], meta["appVersion"]) == ("1.2.3", "1.2.3")
    # Only the pinned lines changed: comments and other values are as they were.
    before = (CHART / "values.yaml").read_text().splitlines()
    after = (chart / "values.yaml").read_text().splitlines()
    assert len(before) == len(after)
    assert [a for a, b in zip(after, before, strict=True) if a != b] == [
        "  repository: ghcr.io/acme/operator",
        '  tag: "1.2.3"',
        f'  digest: "{DIGESTS[0]}"',
        f'  digest: "{DIGESTS[2]}"',
        "  repository: ghcr.io/acme/adapter-server",
        '  tag: "1.2.3"',
        f'  digest: "{DIGESTS[1]}"',
    ]
    out = helm.run("template", "lp", str(chart), "--namespace", "x")
    assert out.returncode == 0, out.stderr
    assert len([line for line in out.stdout.splitlines() if PINNED.search(line)]) == 3
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    [dep] = [d for d in docs if d["kind"] == "Deployment"]
    c = dep["spec"]["template"]["spec"]["containers"][0]
    assert c["image"] == f"ghcr.io/acme/operator:1.2.3@{DIGESTS[0]}"
    assert f"--server-image=ghcr.io/acme/adapter-server:1.2.3@{DIGESTS[1]}" in c["args"]
    assert f"--engine-image=vllm/vllm-openai:v0.32.0@{DIGESTS[2]}" in c["args"]


@pytest.mark.parametrize(
    ("version", "digest", "message"),
    [("1.2", DIGESTS[0], "semantic version"), ("1.2.3", "sha256:abc", "not a sha256 digest")],
)
def test_pin_refuses_bad_input(tmp_path: Path, version: str, digest: str, message: str) -> None:
    chart = tmp_path / "loraplex"
    shutil.copytree(CHART, chart)
    result = pin(chart, "pin", str(chart), version, "ghcr.io/acme", digest, *DIGESTS[1:])
    assert result.returncode != 0 and message in result.stderr
    assert (chart / "values.yaml").read_text() == (CHART / "values.yaml").read_text()
