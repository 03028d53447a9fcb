"""Packaging (issue 2 item 1): the wheel holds optden.kernels and no top-level `kernels`;
``import optden.kernels`` works from a wheel and from a source checkout; optden._C is built."""
from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent  # the repository (tests/ lives in it)

# What a fresh clone has: no virtual environment, build outputs or compiled modules.
_IGNORE = shutil.ignore_patterns(".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", "*.so",
                                 ".pytest_cache", ".gl", "out", "report", ".whl")


def _python_without_site(pythonpath: list[Path | str], code: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run code with ``python -S`` (no .pth files: the editable install's import hook is not
    installed) and ``PYTHONPATH`` = the given paths, then the installed dependencies."""
    paths = [str(p) for p in pythonpath] + site.getsitepackages()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return subprocess.run([sys.executable, "-S", "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A pure-Python wheel built from a copy of the source tree (the repository is not touched)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=_IGNORE)
    env = dict(os.environ, OPTDEN_SKIP_EXT="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w", str(tmp / "dist"),
         str(src)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    (whl,) = (tmp / "dist").glob("optden-*.whl")
    return whl


def test_wheel_contents(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "optden/kernels/__init__.py" in names
    # every package of the source tree (the wings engine/, data/, prune/, ...) ships
    for init in (ROOT / "optden").rglob("__init__.py"):
        assert init.relative_to(ROOT).as_posix() in names, init
    # every Triton kernel module of kernels/ ships inside optden.kernels
    for p in (ROOT / "kernels").glob("*.py"):
        assert f"optden/kernels/{p.name}" in names
    # no top-level `kernels` (an unrelated PyPI package has that name), tests or sources
    tops = {n.split("/")[0] for n in names}
    assert tops == {"optden", wheel.name.split("-")[0] + "-" + wheel.name.split("-")[1] + ".dist-info"}, tops
    info = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
    assert zipfile.ZipFile(wheel).read(info).decode().split() == ["optden"]
    entry = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "optden = optden.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()


def test_installed_wheel_imports_kernels(wheel, tmp_path):
    target = tmp_path / "site"
    out = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(target), str(wheel)],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1"),
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert not (target / "kernels").exists()
    code = (
        "import importlib.util, optden, optden.kernels\n"
        "print(optden.__file__); print(optden.kernels.__file__)\n"
        "print(importlib.util.find_spec('kernels'))\n"
        "print(optden.info()['extension']['loaded'])\n"
    )
    res = _python_without_site([target], code, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    pkg, kern, top, loaded = res.stdout.split()
    assert Path(pkg) == target / "optden" / "__init__.py"
    assert Path(kern) == target / "optden" / "kernels" / "__init__.py"
    assert top == "None"  # `import kernels` finds nothing
    assert loaded == "False"  # built with OPTDEN_SKIP_EXT=1: optden works without _C


def test_source_checkout_imports_kernels(tmp_path):
    """A bare checkout on PYTHONPATH (no install, cwd elsewhere): optden.kernels is kernels/."""
    mods = sorted(p.stem for p in (ROOT / "kernels").glob("*.py") if p.stem != "__init__")
    code = (
        "import importlib.util, optden, optden.kernels\n"
        "print(optden.__file__); print(optden.kernels.__file__)\n"
        f"for m in {mods!r}: print(importlib.util.find_spec('optden.kernels.' + m).origin)\n"
    )
    res = _python_without_site([ROOT], code, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    pkg, kern, *subs = res.stdout.split()
    assert Path(pkg) == ROOT / "optden" / "__init__.py"
    assert Path(kern) == ROOT / "kernels" / "__init__.py"
    assert [Path(s) for s in subs] == [ROOT / "kernels" / f"{m}.py" for m in mods]  # submodules resolve too


def test_extension_is_built_and_loaded():
    import optden
    import optden._C as C

    assert Path(C.__file__).parent == Path(optden.__file__).parent
    ext = optden.info()["extension"]
    assert ext["loaded"] is True and ext["error"] is None
    assert isinstance(C.build_info(), dict) and ext["features"] == dict(C.build_info())
