"""Run the Triton Inference Server bundled in the nvidia-pytriton wheel on a model repository.

The wheel ships `tritonserver`, the Python backend and one backend stub per Python version.
The stub embeds Python and finds its environment through `python3` on PATH, so we put this
interpreter's bin/ first; with a pyenv/shared-libpython interpreter LD_LIBRARY_PATH must
name its LIBDIR, or the stub loads the system libpython. Bound to 127.0.0.1 unless told.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from sftlab.errors import SftlabError


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _pytriton_dir() -> Path:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise SftlabError("the Triton backend needs the 'nvidia-pytriton' package: pip install 'sftlab[triton]'")
    return Path(list(spec.submodule_search_locations)[0])


def check_numpy(python: str) -> None:
    """Triton's Python-backend stub (pytriton <= 0.7) corrupts BYTES tensors under numpy 2."""
    out = subprocess.run([python, "-c", "import numpy; print(numpy.__version__)"], capture_output=True, text=True)
    version = out.stdout.strip()
    if out.returncode != 0 or int(version.split(".")[0]) >= 2:
        raise SftlabError(
            f"Triton's Python backend needs numpy < 2 in {python} (found {version or 'none'}): its stub "
            "garbles BYTES (text) tensors under numpy 2. Install 'numpy<2' (nvidia-pytriton 0.7 pins it) "
            "or point SFTLAB_TRITON_PYTHON at an interpreter whose environment has it.")


class TritonServer:
    """`with TritonServer(repo) as server: server.url` — start, wait for the models, stop."""

    def __init__(self, repository: str | Path, *, host: str = "127.0.0.1", port: int | None = None,
                 python: str | None = None, startup_timeout: float = 180.0, log_path: str | Path | None = None):
        self.repository = Path(repository).resolve()
        if not any(self.repository.glob("*/config.pbtxt")):
            raise SftlabError(f"{self.repository} is not a Triton model repository (no */config.pbtxt)")
        self.host, self.port = host, port or free_port(host)
        self.python = python or os.environ.get("SFTLAB_TRITON_PYTHON") or sys.executable
        self.startup_timeout = startup_timeout
        self.log_path = Path(log_path) if log_path else None
        self.process: subprocess.Popen | None = None
        self._workdir: Path | None = None

    @property
    def url(self) -> str:
        return f"{self.host}:{self.port}"

    def _backends(self, work: Path) -> Path:
        """A backend folder with the Python backend and the stub for this interpreter's Python version."""
        dist = _pytriton_dir() / "tritonserver"
        version = subprocess.run([self.python, "-c", "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')"],
                                 capture_output=True, text=True).stdout.strip()
        stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
        if not stub.exists():
            raise SftlabError(f"nvidia-pytriton ships no Triton Python-backend stub for Python {version}")
        target = work / "backends" / "python"
        shutil.copytree(dist / "backends" / "python", target, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(stub, target / "triton_python_backend_stub")
        return work / "backends"

    def _env(self) -> dict:
        libdir = subprocess.run([self.python, "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"],
                                capture_output=True, text=True).stdout.strip() or sysconfig.get_config_var("LIBDIR")
        libs = [libdir, str(_pytriton_dir().parent / "nvidia_pytriton.libs")]
        env = dict(os.environ)
        env["LD_LIBRARY_PATH"] = os.pathsep.join(libs + [p for p in [env.get("LD_LIBRARY_PATH")] if p])
        env["PATH"] = os.pathsep.join([str(Path(self.python).parent), env.get("PATH", "")])
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // 2)))
        return env

    def start(self) -> "TritonServer":
        check_numpy(self.python)
        self._workdir = Path(tempfile.mkdtemp(prefix="sftlab-triton-"))
        binary = _pytriton_dir() / "tritonserver" / "bin" / "tritonserver"
        cmd = [str(binary), f"--model-repository={self.repository}",
               f"--backend-directory={self._backends(self._workdir)}",
               f"--http-address={self.host}", f"--http-port={self.port}",
               "--allow-grpc=false", "--allow-metrics=false", "--exit-timeout-secs=10", "--strict-readiness=true"]
        log = self.log_path or self._workdir / "tritonserver.log"
        self._log = open(log, "wb")
        self.process = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self._env(),
                                        start_new_session=True)
        atexit.register(self.stop)  # never leave a tritonserver behind if the caller crashes
        try:
            self._wait_ready(log)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, log: Path) -> None:
        import tritonclient.http as httpclient

        models = [p.parent.name for p in self.repository.glob("*/config.pbtxt")]
        client = httpclient.InferenceServerClient(self.url)
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
                raise SftlabError(f"tritonserver exited with code {self.process.returncode}:\n{tail}")
            try:
                if client.is_server_ready() and all(client.is_model_ready(m) for m in models):
                    return
            except Exception:  # not listening yet
                pass
            time.sleep(0.5)
        raise SftlabError(f"tritonserver did not get ready in {self.startup_timeout:.0f} s; log: {log}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if getattr(self, "_log", None):
            self._log.close()
        if self._workdir:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> "TritonServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
