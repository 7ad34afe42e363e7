"""The `loraplex` command line: help, render (the GitOps path), errors that say what to fix."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from loraplex.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_help_lists_the_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for word in ("operator", "render", "plan"):
        assert word in out


def test_render_prints_what_the_operator_applies(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["render", "-f", str(ROOT / "examples")]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [d["kind"] for d in docs] == [
        "Secret",
        "ConfigMap",  # manifest shard 0
        "ConfigMap",  # manifest index, after its shards
        "NetworkPolicy",
        "Deployment",
        "Service",
    ]


def test_render_reports_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bm.yaml"
    bad.write_text(
        "apiVersion: loraplex.io/v1alpha1\nkind: BaseModel\nmetadata: {name: b}\n"
        "spec: {model: {source: 'hf://a/b'}, replicas: -3}\n"
    )
    assert main(["render", "-f", str(bad)]) == 2
    assert "spec.replicas" in capsys.readouterr().err


def test_console_script_runs() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "loraplex.cli", "render", "-f", str(ROOT / "examples")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "kind: Deployment" in out.stdout
