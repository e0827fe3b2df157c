"""Packaging: every package folder is listed, and everything installs under mosear_fast only."""

import pathlib
import subprocess
import sys
import zipfile

import pytest
import tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]
NAMESPACE_DIRS = {"mosear_fast": "mosear_fast", "kernels": "mosear_fast.kernels", "export": "mosear_fast.export",
                  "training": "mosear_fast.training"}


def _listed_packages():
    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])


def test_every_package_folder_is_listed():
    found = set()
    for folder, prefix in NAMESPACE_DIRS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((prefix, *rel)))
    assert found == _listed_packages()


@pytest.mark.slow
def test_wheel_installs_only_under_mosear_fast(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(ROOT),
                    "-w", str(tmp_path)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"mosear_fast"}
    assert "mosear_fast/kernels/mose/reference.py" in names
