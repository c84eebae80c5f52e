"""patches/openrlhf-<installed version>.diff applies cleanly to a copy of the installed openrlhf package.

"Cleanly" means no fuzz (-F0), no offset, no rejects, not already applied. Every patched file must then byte-compile.
The diff is applied with the `patch` binary, or with `git apply` where `patch` is absent. See patches/README.md.
"""

import importlib.metadata
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PATCHES = Path(__file__).resolve().parents[1] / "patches"


def _run(cmd, cwd=None, env=None):
    return subprocess.run(cmd, cwd=cwd, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True)


@pytest.fixture
def installed():
    """(version, package dir, diff path) of the installed openrlhf; skip if absent, fail if it has no diff."""
    try:
        version = importlib.metadata.version("openrlhf")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("openrlhf is not installed, so there is nothing to patch (pip install 'po-plugins[openrlhf]')")
    spec = importlib.util.find_spec("openrlhf")  # locates the package without importing it (no GPU deps needed)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"openrlhf {version} has distribution metadata but no importable package")
    diff = PATCHES / f"openrlhf-{version}.diff"
    if not diff.is_file():
        have = sorted(p.name for p in PATCHES.glob("openrlhf-*.diff"))
        pytest.fail(f"openrlhf {version} is installed but {diff.relative_to(PATCHES.parent)} does not exist "
                    f"(patches for: {have}). Port the seam patch to this release as patches/README.md describes "
                    f"(diff -u of a clean and an edited copy of site-packages/openrlhf, paths a/openrlhf/...).")
    return version, Path(list(spec.submodule_search_locations)[0]), diff


def _patched_files(diff: Path) -> list:
    files = re.findall(r"^\+\+\+ b/(\S+)", diff.read_text(), flags=re.M)
    assert files, f"{diff.name} names no files (+++ b/...)"
    assert all(f.startswith("openrlhf/") for f in files), f"{diff.name}: paths must be a/openrlhf/..., got {files}"
    return files


def _copy(pkg: Path, dest: Path) -> Path:
    root = dest / "site"
    shutil.copytree(pkg, root / "openrlhf", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return root


def _git(root: Path, *args):
    env = {**os.environ, "GIT_CEILING_DIRECTORIES": str(root.parent)}  # never apply into an enclosing repository
    return _run(["git", "apply", "-p1", *args], cwd=root, env=env)


def test_installed_openrlhf_has_a_seam_patch_that_applies_cleanly_and_compiles(installed, tmp_path):
    version, pkg, diff = installed
    files = _patched_files(diff)
    root = _copy(pkg, tmp_path)
    missing = [f for f in files if not (root / f).is_file()]
    assert not missing, f"openrlhf {version} ({pkg}) lacks files the diff patches: {missing}"
    before = {f: (root / f).read_bytes() for f in files}

    if shutil.which("patch"):
        base = ["patch", "-p1", "-F0", "-N", "--no-backup-if-mismatch", "-d", str(root), "-i", str(diff)]
        dry = _run(base[:1] + ["--dry-run"] + base[1:])
        out = dry.stdout + dry.stderr
        assert dry.returncode == 0, f"{diff.name} does not apply to openrlhf {version} at {pkg}:\n{out}"
        # patch reports a hunk only when it is offset, fuzzed, failed or already applied
        assert not re.search(r"Hunk #|fuzz|offset|FAILED|Reversed|previously applied", out), \
            f"{diff.name} applies to openrlhf {version} only approximately:\n{out}"
        real = _run(base)
        assert real.returncode == 0, real.stdout + real.stderr
    elif shutil.which("git"):
        check = _git(root, "--check", str(diff))
        assert check.returncode == 0, f"{diff.name} does not apply to openrlhf {version} (git apply --check):\n" \
                                      f"{check.stdout}{check.stderr}"
        real = _git(root, str(diff))
        assert real.returncode == 0, real.stdout + real.stderr
    else:
        pytest.skip("neither `patch` nor `git` is on PATH, so the diff cannot be applied")

    leftovers = [str(p.relative_to(root)) for p in root.rglob("*") if p.suffix in (".rej", ".orig")]
    assert not leftovers, f"rejects/backups after applying {diff.name}: {leftovers}"
    unchanged = [f for f in files if (root / f).read_bytes() == before[f]]
    assert not unchanged, f"{diff.name} left these files unchanged: {unchanged}"

    comp = _run([sys.executable, "-m", "py_compile", *(str(root / f) for f in files)])
    assert comp.returncode == 0, f"patched openrlhf {version} does not byte-compile:\n{comp.stdout}{comp.stderr}"


def test_seam_patch_is_also_accepted_by_git_apply(installed, tmp_path):
    """Upstream PRs go through git: the same diff must pass `git apply --check` (exact context, no fuzz)."""
    if not shutil.which("git"):
        pytest.skip("git is not on PATH")
    version, pkg, diff = installed
    root = _copy(pkg, tmp_path)
    check = _git(root, "--check", str(diff))
    assert check.returncode == 0, f"git apply --check rejects {diff.name} on openrlhf {version}:\n" \
                                  f"{check.stdout}{check.stderr}"
