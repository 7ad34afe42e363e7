"""checkov, an outside scanner, on what we ship: every Kubernetes check passes or is skipped
in tests/security/checkov-skips.yaml with a reason.

Matrix: `loraplex render -f examples/` (with the release's digest-pinned image flags) and
`helm template` (with the release's digests) are scanned in one checkov run; each failed
check must match a skip entry for its target, and each skip entry must still match a failure
(a stale skip hides nothing and is removed). The skip file itself: one reason per entry, known
targets, the podspec section names its issue 9 point. The matcher is shown to catch an
unlisted failure and a stale entry.

checkov pins old versions of packages the project venv needs newer (boto3, packaging,
networkx), so it lives in its own venv: `.venv/checkov` (tests/security/install_tools.sh,
run by `make setup`). It runs offline (`--skip-download`).
"""

from __future__ import annotations

import fnmatch
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.chart.conftest import CHART, RELEASE, RELEASE_NAMESPACE, Helm

pytestmark = [pytest.mark.security, pytest.mark.chart, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]
SKIPS_FILE = Path(__file__).with_name("checkov-skips.yaml")
CHECKOV = Path(sys.prefix) / "checkov" / "bin" / "checkov"
# What release.yaml writes: every image the chart runs or hands to the operator by digest.
DIGEST = "sha256:" + "0123456789abcdef" * 4
TARGETS = ("render", "helm")
PODSPEC_TITLE = "fixed by the podspec branch (lead removes at merge)"


@dataclass(frozen=True)
class Failure:
    check: str
    target: str
    resource: str


@dataclass(frozen=True)
class Skip:
    check: str
    target: str
    resource: str
    reason: str
    section: str

    def covers(self, f: Failure) -> bool:
        return (self.check, self.target) == (f.check, f.target) and fnmatch.fnmatchcase(
            f.resource, self.resource
        )


def load_skips() -> list[Skip]:
    doc = yaml.safe_load(SKIPS_FILE.read_text())
    return [
        Skip(e["check"], e["target"], e["resource"], e["reason"], section["title"])
        for section in doc["sections"]
        for e in section["skips"]
    ]


def unmatched(failures: set[Failure], skips: list[Skip]) -> tuple[list[Failure], list[Skip]]:
    """Failures no skip covers, and skips that cover no failure."""
    loose = sorted(
        (f for f in failures if not any(s.covers(f) for s in skips)), key=lambda f: f.check
    )
    stale = [s for s in skips if not any(s.covers(f) for f in failures)]
    return loose, stale


def shipped(helm: Helm, out: Path) -> None:
    """Write render.yaml and helm.yaml into `out` as the release ships them."""
    image = {"engine": f"vllm/vllm-openai:v0.32.0@{DIGEST}"}
    image["server"] = f"ghcr.io/loraplex/adapter-server:0.1.0@{DIGEST}"
    render = subprocess.run(
        [
            sys.executable,
            "-m",
            "loraplex.cli",
            "render",
            "-f",
            str(ROOT / "examples"),
            f"--engine-image={image['engine']}",
            f"--server-image={image['server']}",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    (out / "render.yaml").write_text(render.stdout)
    digests = [f"{k}.digest={DIGEST}" for k in ("image", "engineImage", "serverImage")]
    result = helm.run(
        "template",
        RELEASE,
        str(CHART),
        "--namespace",
        RELEASE_NAMESPACE,
        *[a for d in digests for a in ("--set", d)],
    )
    assert result.returncode == 0, result.stderr
    (out / "helm.yaml").write_text(result.stdout)


@pytest.fixture(scope="module")
def scan(helm: Helm, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    if not CHECKOV.is_file():
        pytest.fail(f"checkov is missing at {CHECKOV}: run tests/security/install_tools.sh")
    out = tmp_path_factory.mktemp("shipped")
    shipped(helm, out)
    proc = subprocess.run(
        [
            str(CHECKOV),
            "--directory",
            str(out),
            "--framework",
            "kubernetes",
            "--skip-download",
            "--output",
            "json",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
        cwd=out,
        env={"PATH": "/usr/bin:/bin", "HOME": str(out), "BC_SKIP_MAPPING": "TRUE"},
    )
    assert proc.returncode in (0, 1), proc.stderr[-3000:]  # 1: some check failed
    report = json.loads(proc.stdout)
    [k8s] = [r for r in (report if isinstance(report, list) else [report])]
    assert k8s["check_type"] == "kubernetes"
    return dict(k8s)


def failures_of(report: dict[str, Any]) -> set[Failure]:
    return {
        Failure(f["check_id"], Path(f["file_path"]).stem, f["resource"])
        for f in report["results"]["failed_checks"]
    }


def test_every_failed_check_is_fixed_or_skipped_with_a_reason(scan: dict[str, Any]) -> None:
    failures = failures_of(scan)
    loose, stale = unmatched(failures, load_skips())
    summary = scan["summary"]
    print(
        f"checkov {summary['checkov_version']}: passed {summary['passed']}, "
        f"failed {summary['failed']} (all listed in {SKIPS_FILE.name}), "
        f"resources {summary['resource_count']}"
    )
    assert not loose, "fix these or add them to checkov-skips.yaml with a reason: " + "\n".join(
        f"{f.check} {f.target} {f.resource}" for f in loose
    )
    assert not stale, "these skips match no failure any more; remove them: " + "\n".join(
        f"{s.check} {s.target} {s.resource}" for s in stale
    )
    # Both targets were really scanned: objects from each file were checked.
    scanned = {Path(p["file_path"]).stem for p in scan["results"]["passed_checks"]}
    assert scanned == set(TARGETS)
    assert summary["passed"] > 150


def test_what_we_fixed_stays_fixed(scan: dict[str, Any]) -> None:
    """The checks this branch made pass (NetworkPolicies, digests, secret files) are not
    skipped anywhere, so a regression fails the scan test."""
    fixed = {"CKV2_K8S_6", "CKV_K8S_43", "CKV_K8S_15", "CKV_K8S_35"}
    assert not {s.check for s in load_skips()} & fixed
    passed = {(p["check_id"], Path(p["file_path"]).stem) for p in scan["results"]["passed_checks"]}
    for check in fixed:
        assert (check, "helm") in passed, check
    for check in fixed - {"CKV_K8S_35"}:
        assert (check, "render") in passed, check


def test_skip_file_is_well_formed() -> None:
    doc = yaml.safe_load(SKIPS_FILE.read_text())
    titles = [s["title"] for s in doc["sections"]]
    assert PODSPEC_TITLE in titles and len(titles) == len(set(titles))
    for section in doc["sections"]:
        for e in section["skips"]:
            assert set(e) <= {"check", "target", "resource", "reason", "fixed_by"}, e
            assert e["target"] in TARGETS, e
            assert len(e["reason"].split()) >= 8, f"{e['check']}: give a real reason"
            if section["title"] == PODSPEC_TITLE:
                assert e["fixed_by"].startswith("issue 9 point "), e
    keys = [(s.check, s.target, s.resource) for s in load_skips()]
    assert len(keys) == len(set(keys))


def test_matcher_catches_unlisted_and_stale() -> None:
    skip = Skip("CKV_K8S_21", "render", "*.default.*", "reason", "t")
    ok = Failure("CKV_K8S_21", "render", "Service.default.x")
    assert unmatched({ok}, [skip]) == ([], [])
    other_target = Failure("CKV_K8S_21", "helm", "Service.default.x")
    other_check = Failure("CKV_K8S_20", "render", "Service.default.x")
    assert unmatched({other_target, other_check}, [skip]) == (
        sorted([other_target, other_check], key=lambda f: f.check),
        [skip],
    )
