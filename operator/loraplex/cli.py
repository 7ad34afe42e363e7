"""`loraplex`: run the operator, render what it would apply, or plan GPU memory."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from loraplex import __version__
from loraplex.planner.cli import add_plan_parser
from loraplex.render import (
    DEFAULT_OPERATOR_PODS,
    DEFAULT_SERVER_IMAGE,
    Images,
    OperatorPods,
    parse_labels,
)
from loraplex.versions import DEFAULT_ENGINE_IMAGE


def _operator_pods(args: argparse.Namespace) -> OperatorPods:
    return OperatorPods(namespace=args.operator_namespace, labels=args.operator_pod_labels)


def _operator(args: argparse.Namespace) -> int:
    from loraplex.runner import OperatorOptions, load_token_key, run_operator

    opts = OperatorOptions(
        namespaces=tuple(args.namespace or ()),
        metrics_port=args.metrics_port,
        peering=args.peering,
        peering_lifetime=args.peering_lifetime,
        token_key=load_token_key(args.token_key_file),
        images=Images(engine=args.engine_image, server=args.server_image),
        operator_pods=_operator_pods(args),
        log_json=args.log_format == "json",
        verbose=args.log_level == "debug",
    )
    asyncio.run(run_operator(opts))
    return 0


def _render(args: argparse.Namespace) -> int:
    from loraplex.offline import render_paths

    try:
        objects = render_paths(
            [Path(p) for p in args.file],
            images=Images(engine=args.engine_image, server=args.server_image),
            operator=_operator_pods(args),
        )
    except (OSError, ValueError) as exc:
        print(f"loraplex render: {exc}", file=sys.stderr)
        return 2
    docs: list[Any] = objects
    sys.stdout.write(yaml.safe_dump_all(docs, sort_keys=False, width=100))
    return 0


def _labels_arg(text: str) -> tuple[tuple[str, str], ...]:
    try:
        return parse_labels(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="loraplex",
        description="Serve many LoRA adapters on one vLLM base model, on Kubernetes.",
    )
    parser.add_argument("--version", action="version", version=f"loraplex {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    rendering = argparse.ArgumentParser(add_help=False)
    rendering.add_argument(
        "--engine-image",
        default=DEFAULT_ENGINE_IMAGE,
        help="vLLM image for BaseModels that do not set spec.engine.image",
    )
    rendering.add_argument(
        "--server-image",
        default=DEFAULT_SERVER_IMAGE,
        help="adapter-server image for BaseModels without spec.server.image",
    )

    # Who may reach each BaseModel's admin port (its NetworkPolicy): the operator's own pods.
    rendering.add_argument(
        "--operator-namespace",
        default=os.environ.get("POD_NAMESPACE") or DEFAULT_OPERATOR_PODS.namespace,
        help="namespace of the operator's pods, admitted to the admin port by each "
        "BaseModel's NetworkPolicy (default: $POD_NAMESPACE, else %(default)s)",
    )
    rendering.add_argument(
        "--operator-pod-labels",
        type=_labels_arg,
        default=DEFAULT_OPERATOR_PODS.labels,
        metavar="K=V[,K=V]",
        help="labels of the operator's pods, for the same NetworkPolicy rule (default: "
        + ",".join(f"{k}={v}" for k, v in DEFAULT_OPERATOR_PODS.labels)
        + "; the chart sets its release's labels)",
    )

    op = sub.add_parser(
        "operator",
        parents=[rendering],
        help="run the operator against the current cluster",
        description="Run the operator. Finds the cluster like kubectl (in-cluster, KUBECONFIG "
        "or ~/.kube/config) and watches all namespaces unless --namespace is given.",
    )
    op.add_argument(
        "--namespace", "-n", action="append", help="watch only this namespace (repeatable)"
    )
    op.add_argument("--metrics-port", type=int, default=8080, help="port for /metrics and /healthz")
    op.add_argument(
        "--peering",
        default=None,
        help="kopf peering name, so several replicas elect one active (default: standalone)",
    )
    op.add_argument(
        "--peering-lifetime",
        type=int,
        default=60,
        help="seconds a silent active replica is trusted before a standby takes over",
    )
    op.add_argument(
        "--token-key-file",
        default=None,
        help="key that admin tokens are derived from (else $LORAPLEX_TOKEN_KEY)",
    )
    op.add_argument("--log-format", choices=["json", "text"], default="json")
    op.add_argument("--log-level", choices=["debug", "info"], default="info")
    op.set_defaults(func=_operator)

    rd = sub.add_parser(
        "render",
        parents=[rendering],
        help="print the objects the operator would apply",
        description="Render, without a cluster, exactly what the operator applies for the "
        "BaseModels and LoRAAdapters in the given files or directories (for GitOps diffs).",
    )
    rd.add_argument("-f", "--file", action="append", required=True, help="YAML file or directory")
    rd.set_defaults(func=_render)

    add_plan_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    raise SystemExit(main())
