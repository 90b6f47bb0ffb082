"""scripts/setup.sh (which scripts/test.sh runs) and its Debian packages (chromium, tcmalloc):
installed on every run when missing, a no-op when present, and a failed install leaves no
"all set up" stamp."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ("bash", "cat", "sha256sum", "cut", "dirname", "grep", "chmod", "touch")
FAKE_APT = """#!/bin/bash
echo "$*" >> "$APT_CALLS"
if [ "$1" = install ]; then
  [ "$APT_WORKS" = 1 ] || exit 100
  printf '#!/bin/bash\\n' > "$FAKE_BIN/chromium" && chmod +x "$FAKE_BIN/chromium"
  touch "$FAKE_BIN/tcmalloc-installed"
fi
"""
# ldconfig -p lists tcmalloc once the stand-in apt-get has installed it
FAKE_LDCONFIG = """#!/bin/bash
[ -e "$FAKE_BIN/tcmalloc-installed" ] && printf '\\tlibtcmalloc_minimal.so.4 (libc6,x86-64) => /x\\n'
exit 0
"""


def _sandbox(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A copy of the scripts, a venv whose python does nothing, and a PATH with root's `id`,
    a stand-in apt-get and ldconfig, no chromium and no tcmalloc."""
    repo, bin_ = tmp_path / "repo", tmp_path / "bin"
    (repo / "scripts").mkdir(parents=True)
    for name in ("scripts/setup.sh", "scripts/install_system_packages.sh", "pyproject.toml"):
        shutil.copy(ROOT / name, repo / name)
    bin_.mkdir()
    for tool in TOOLS:
        (bin_ / tool).symlink_to(shutil.which(tool))
    (repo / "venv" / "bin").mkdir(parents=True)
    fakes = {bin_ / "id": "#!/bin/bash\necho 0\n", bin_ / "apt-get": FAKE_APT, bin_ / "ldconfig": FAKE_LDCONFIG,
             repo / "venv" / "bin" / "python": "#!/bin/bash\nexit 0\n"}
    for path, text in fakes.items():
        path.write_text(text)
        path.chmod(0o755)
    env = {"PATH": str(bin_), "VENV": "venv", "PYTHON": sys.executable, "FAKE_BIN": str(bin_),
           "APT_CALLS": str(tmp_path / "apt-calls"), "HOME": os.environ.get("HOME", str(tmp_path))}
    return repo, env


def _setup(repo: Path, env: dict[str, str], apt_works: bool) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "scripts/setup.sh"], cwd=repo, env={**env, "APT_WORKS": str(int(apt_works))},
                          capture_output=True, text=True, timeout=60, executable=shutil.which("bash"))


def _installs(env: dict[str, str]) -> int:
    calls = Path(env["APT_CALLS"])
    return sum(line.startswith("install") for line in calls.read_text().splitlines()) if calls.exists() else 0


def test_a_failed_browser_install_leaves_no_stamp_and_is_retried(tmp_path):
    repo, env = _sandbox(tmp_path)
    stamp = repo / "venv" / ".sftlab-installed"
    failed = _setup(repo, env, apt_works=False)
    assert failed.returncode == 0, failed.stderr  # the rest of the tests still run
    assert "could not install chromium libtcmalloc-minimal4" in failed.stderr and "setup incomplete" in failed.stderr
    assert not stamp.exists() and _installs(env) == 1
    done = _setup(repo, env, apt_works=True)
    assert done.returncode == 0 and "installed chromium libtcmalloc-minimal4" in done.stdout
    assert stamp.exists() and _installs(env) == 2


def test_the_packages_are_checked_on_every_run_and_left_alone_when_present(tmp_path):
    repo, env = _sandbox(tmp_path)
    assert _setup(repo, env, apt_works=True).returncode == 0 and _installs(env) == 1
    assert _setup(repo, env, apt_works=True).returncode == 0 and _installs(env) == 1  # present: no apt
    (Path(env["FAKE_BIN"]) / "chromium").unlink()  # removed after setup: the stamp does not hide it
    again = _setup(repo, env, apt_works=True)
    assert again.returncode == 0 and "installed chromium\n" in again.stdout and _installs(env) == 2
    (Path(env["FAKE_BIN"]) / "tcmalloc-installed").unlink()  # the allocator alone missing
    again = _setup(repo, env, apt_works=True)
    assert again.returncode == 0 and "installed libtcmalloc-minimal4\n" in again.stdout and _installs(env) == 3
