"""Static checks of docker/Dockerfile (no Docker daemon needed)."""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO_ROOT / "docker" / "Dockerfile"


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs: comments dropped, continuation lines joined."""
    out: list[tuple[str, str]] = []
    buf = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue  # comment inside a continued instruction
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


@pytest.fixture(scope="module")
def instructions():
    return _instructions(DOCKERFILE.read_text())


@pytest.fixture(scope="module")
def args(instructions):
    """Default values of ARG instructions (for ${VAR} substitution)."""
    values = {}
    for ins, rest in instructions:
        if ins == "ARG" and "=" in rest:
            k, _, v = rest.partition("=")
            values[k.strip()] = v.strip().strip('"')
    return values


def _expand(s: str, values: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: values.get(m.group(1), m.group(0)), s)


def _pip_installs(instructions, args) -> list[str]:
    """Every `pip install ...` command of every RUN, ARG defaults substituted."""
    cmds = []
    for ins, rest in instructions:
        if ins != "RUN":
            continue
        for part in re.split(r"&&|;", _expand(rest, args)):
            part = part.strip()
            if re.match(r"^(python3? -m )?pip3? install\b", part):
                cmds.append(part)
    return cmds


def test_base_image_pinned(instructions, args):
    froms = [_expand(rest, args).split()[0] for ins, rest in instructions if ins == "FROM"]
    assert froms, "no FROM"
    for image in froms:
        name, _, digest = image.partition("@")
        last = name.rsplit("/", 1)[-1]
        assert ":" in last or digest, f"{image}: no explicit tag"
        tag = last.partition(":")[2]
        assert tag and tag != "latest", f"{image}: pin an explicit tag, not latest"
        assert "$" not in image, f"{image}: unresolved variable"
    # A CUDA PyTorch base, devel flavour (transformer-engine builds need nvcc).
    assert re.search(r"cuda", froms[-1]) and "devel" in froms[-1], froms[-1]


@pytest.mark.parametrize("package", ["flash-attn", "transformer-engine[pytorch]"])
def test_gpu_extras_installed_pinned(instructions, args, package):
    found = []
    for cmd in _pip_installs(instructions, args):
        for tok in shlex.split(cmd):
            if tok.lower().startswith(package + "=="):
                found.append(tok)
    assert found, f"{package} is not pip-installed with a pinned version"
    version = found[0].split("==", 1)[1]
    assert re.fullmatch(r"\d+(\.\d+)+(\.post\d+)?", version), found[0]


def test_project_installed_with_gpu_extra(instructions, args):
    cmds = [shlex.split(c) for c in _pip_installs(instructions, args)]
    assert any(".[gpu]" in c for c in cmds), cmds
    assert any(ins == "COPY" for ins, _ in instructions)
    # The [gpu] extra exists in pyproject and names the same packages.
    if sys.version_info >= (3, 11):
        import tomllib

        extras = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"][
            "optional-dependencies"
        ]["gpu"]
        joined = " ".join(extras)
        assert "flash-attn" in joined and "transformer-engine" in joined, extras


def test_runs_as_non_root(instructions):
    users = [rest.split(":")[0].strip() for ins, rest in instructions if ins == "USER"]
    assert users, "no USER instruction: the container would run as root"
    assert users[-1] not in {"root", "0"}, users
    workdirs = [rest for ins, rest in instructions if ins == "WORKDIR"]
    assert workdirs, "no WORKDIR"


def test_entry_point_runs_launch_train(instructions):
    entry = [rest for ins, rest in instructions if ins in {"ENTRYPOINT", "CMD"}]
    joined = []
    for rest in entry:
        joined += json.loads(rest) if rest.startswith("[") else shlex.split(rest)
    assert "launch.train" in joined and "-m" in joined, entry


def test_dockerignore_keeps_context_small():
    ignore = (REPO_ROOT / "docker" / "Dockerfile.dockerignore").read_text().split()
    for entry in (".git", "runs", "logs"):
        assert entry in ignore, entry


def test_readme_covers_docker_and_pyxis():
    text = (REPO_ROOT / "docker" / "README.md").read_text()
    assert "docker build -f docker/Dockerfile" in text
    assert "docker run" in text
    assert "--container-image=" in text and "enroot import" in text
