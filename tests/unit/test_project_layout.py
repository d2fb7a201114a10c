"""The project installs as `dragonfly` + `dragonfly_platform` and never shadows the stdlib."""

import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_import_platform_is_the_standard_library_from_the_repo_root():
    code = "import platform, dragonfly_platform; print(platform.__file__); print(platform.python_version())"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert not out[0].startswith(str(REPO)), out[0]
    assert out[1] == ".".join(map(str, sys.version_info[:3]))


def test_platform_folder_is_not_a_package():
    assert not (REPO / "platform" / "__init__.py").exists()


def test_model_library_imports_no_distributed_stack():
    banned = ("ray", "mlflow", "deepspeed", "s3fs")
    for path in (REPO / "dragonfly").rglob("*.py"):
        for line in path.read_text().splitlines():
            words = line.strip().split()
            if len(words) >= 2 and words[0] in ("import", "from"):
                root = words[1].split(".")[0]
                assert root not in banned, f"{path.name}: {line.strip()}"
