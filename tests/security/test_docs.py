"""docs/security.md and docs/production.md name only things that exist.

Matrix: every flag, chart value, BaseModel field and file security.md names for the
boundaries this branch owns is real (CLI parser, values.yaml, the CRD schema, the tree);
the VAP table's rows are the verdicts the policy test checks; both docs' relative links
resolve; the README links both.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from loraplex.cli import build_parser
from tests.chart.test_chart_security import CASES
from tests.support.crd import crd_schema

pytestmark = pytest.mark.security
ROOT = Path(__file__).resolve().parents[2]
SECURITY = ROOT / "docs" / "security.md"
PRODUCTION = ROOT / "docs" / "production.md"


def operator_flags() -> set[str]:
    parser = build_parser()
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {s for a in sub.choices["operator"]._actions for s in a.option_strings}


def has_value(path: str) -> bool:
    node: Any = yaml.safe_load((ROOT / "charts/loraplex/values.yaml").read_text())
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def has_field(path: str) -> bool:
    node = crd_schema("BaseModel")["properties"]["spec"]
    for part in path.split("."):
        node = (node.get("properties") or {}).get(part)
        if node is None:
            return False
    return True


def test_named_flags_values_fields_and_files_exist() -> None:
    text = SECURITY.read_text()
    flags = set(re.findall(r"`(--[a-z-]+)", text))
    assert {"--operator-namespace", "--operator-pod-labels", "--token-key-file"} <= flags
    assert flags <= operator_flags(), flags - operator_flags()
    for value in ("secretsAdmissionPolicy.enabled", "networkPolicy.metricsFrom", "watchNamespaces"):
        assert f"`{value}`" in text and has_value(value), value
    fields = set(re.findall(r"`spec\.([a-zA-Z.]+)`", text))
    assert {"networkPolicy.enabled", "networkPolicy.publicFrom"} <= fields
    assert all(has_field(f) for f in fields), [f for f in fields if not has_field(f)]
    for path in re.findall(r"(tests/[a-z_/]+\.(?:py|yaml)|operator/[a-z_/]+\.py)", text):
        assert (ROOT / path).is_file(), path


def test_vap_table_matches_the_tested_verdicts() -> None:
    text = SECURITY.read_text()
    rows = re.findall(r"^\| (.+?) \| .+? \| .+? \| (allowed|denied|not matched) \|$", text, re.M)
    verdicts = {v for _, v in rows}
    assert verdicts == {"allowed", "denied", "not matched"}
    tested = {"unmatched" if v == "not matched" else v for v in verdicts}
    assert tested == {expected for _, expected in CASES.values()}
    assert len(rows) >= 8


@pytest.mark.parametrize("doc", [SECURITY, PRODUCTION], ids=lambda p: p.name)
def test_relative_links_resolve(doc: Path) -> None:
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", doc.read_text()):
        assert (doc.parent / target).exists(), target


def test_readme_links_both() -> None:
    readme = (ROOT / "README.md").read_text()
    assert "(docs/security.md)" in readme and "(docs/production.md)" in readme
