"""What the Comfy Registry would publish: the git-tracked files minus `.comfyignore` (its
packer, `comfy node pack`, zips exactly that). The matching here is git's own gitignore
matcher (`git ls-files --ignored --exclude-from`), the syntax `.comfyignore` is written in."""

from __future__ import annotations

import io
import shutil
import subprocess
import zipfile

import pytest
import tomllib
from comfyui_client import COMFYUI_DIR
from PIL import Image

from conftest import ROOT

PACKAGE_LIMIT = (
    8_000_000  # bytes, zipped: the shipped tiny default model is ~5 MB of it; the test fixtures alone are ~45 MB
)


def git_files(*args: str) -> list[str]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout of the pack")
    out = subprocess.run(["git", "-C", str(ROOT), "ls-files", *args], capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


def published_files() -> list[str]:
    ignored = set(git_files("--cached", "--ignored", "--exclude-from=.comfyignore"))
    return [path for path in git_files() if path not in ignored]


def test_comfyignore_leaves_out_tests_and_keeps_what_comfyui_loads():
    tracked = git_files()
    published = set(published_files())
    assert any(path.startswith("tests/fixtures/") for path in tracked)
    assert not [path for path in published if path.startswith(("tests/", "scripts/", ".ci/"))]
    for runtime in ("__init__.py", "nodes/", "liveavatar_core/", "web/", "workflows/", "requirements.txt", "LICENSE"):
        wanted = [path for path in tracked if path == runtime or path.startswith(runtime)]
        assert wanted and set(wanted) <= published, f"{runtime} is left out of the package"


def test_published_package_is_small():
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in published_files():
            archive.write(ROOT / path, path)
    assert buffer.tell() < PACKAGE_LIMIT, f"the package is {buffer.tell() / 1e6:.1f} MB"


def test_registry_metadata_points_at_files_that_exist():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    comfy = config["tool"]["comfy"]
    repository = config["project"]["urls"]["Repository"]
    owner_repo = repository.removeprefix("https://github.com/")
    prefix = f"https://raw.githubusercontent.com/{owner_repo}/main/"
    assert comfy["Icon"].startswith(prefix)
    icon = ROOT / comfy["Icon"].removeprefix(prefix)
    with Image.open(icon) as image:
        assert image.width == image.height <= 400  # the registry's icon limit
    # The ComfyUI the server tests run against must be inside the range the registry advertises.
    specifiers = pytest.importorskip("packaging.specifiers")
    version_file = COMFYUI_DIR / "comfyui_version.py"
    if version_file.exists():
        tested = version_file.read_text().split("__version__ = ")[1].split()[0].strip("\"'")
        assert specifiers.SpecifierSet(comfy["requires-comfyui"]).contains(tested)
    assert "Environment :: GPU :: NVIDIA CUDA" in config["project"]["classifiers"]
