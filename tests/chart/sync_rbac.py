"""Write the chart's RBAC rules file from `loraplex.rbac`, the one list of API calls.

Helm cannot import Python, so the chart reads `files/rbac.yaml`, which this script renders
from `loraplex.rbac.RULES`, `CLUSTER_RULES` and `NAMESPACED_KOPF_RULES`. The chart tests fail
when the file drifts (run this script to fix) and when the rendered Roles differ from the
Python lists in any way.

    .venv/bin/python tests/chart/sync_rbac.py          # rewrite the file
    .venv/bin/python tests/chart/sync_rbac.py --check  # exit 1 if it is stale
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

from loraplex import rbac

RBAC_FILE = Path(__file__).resolve().parents[2] / "charts" / "loraplex" / "files" / "rbac.yaml"

HEADER = """\
# Generated from operator/loraplex/rbac.py by `python tests/chart/sync_rbac.py`; do not edit.
# rules: every watched namespace (Role) or the whole cluster (ClusterRole).
# clusterRules: cluster-scoped extras kopf needs (CRD discovery, namespaces, cluster peering).
# namespacedKopfRules: kopf peering inside each watched namespace.
"""


def policy_rules(rules: tuple[rbac.Rule, ...]) -> list[dict[str, Any]]:
    """Kubernetes PolicyRule dicts, one per `Rule`, in the same order."""
    return [
        {"apiGroups": [r.api_group], "resources": list(r.resources), "verbs": list(r.verbs)}
        for r in rules
    ]


def render() -> str:
    doc = {
        "rules": policy_rules(rbac.RULES),
        "clusterRules": policy_rules(rbac.CLUSTER_RULES),
        "namespacedKopfRules": policy_rules(rbac.NAMESPACED_KOPF_RULES),
    }
    return HEADER + yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--check", action="store_true", help="fail if the file is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not RBAC_FILE.is_file() or RBAC_FILE.read_text() != text:
            print(f"{RBAC_FILE} is stale; run: python tests/chart/sync_rbac.py", file=sys.stderr)
            return 1
        return 0
    RBAC_FILE.write_text(text)
    print(RBAC_FILE)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
