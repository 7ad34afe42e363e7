"""The command line: the operator's rendered flags must parse, and the docs' metric list holds.

Matrix: `loraplex.render.server_args()` (exactly what the pod runs) parses into Settings with
no extra flags needed; optional flags keep their defaults; metric names are unique and
prefixed.
"""

from __future__ import annotations

from pathlib import Path

from loraplex_server.metrics import METRIC_NAMES, Metrics
from loraplex_server.settings import parse_args


def test_operator_rendered_flags_parse() -> None:
    from loraplex import naming
    from loraplex.render import server_args

    s = parse_args(server_args())
    assert s.vllm_url == f"http://127.0.0.1:{naming.VLLM_PORT}"
    assert (s.port, s.admin_port) == (naming.PUBLIC_PORT, naming.ADMIN_PORT)
    assert s.manifest == Path(naming.MANIFEST_DIR) / naming.MANIFEST_KEY
    assert s.admin_token_file == Path(naming.ADMIN_DIR) / naming.TOKEN_KEY
    assert (s.cache_dir, s.pvc_root) == (Path(naming.CACHE_DIR), Path(naming.PVC_ROOT))
    assert s.host == "0.0.0.0"  # reachable by the Service and the operator
    assert s.load_timeout == 60.0 and s.download_attempts == 5


def test_metric_names_are_exported_and_prefixed() -> None:
    assert len(set(METRIC_NAMES)) == len(METRIC_NAMES)
    assert all(n.startswith("loraplex_server_") for n in METRIC_NAMES)
    text = Metrics().render().decode()
    for name in METRIC_NAMES:
        assert f"# HELP {name} " in text, name
