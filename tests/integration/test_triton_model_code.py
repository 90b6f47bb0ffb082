"""The Triton model folder runs where sftlab is not installed (NVIDIA's container: torch + transformers).

Triton's Python backend imports `<model>/1/model.py` in a stub process; what that file imports must come
from the folder itself. The server test (test_deploy_export.py) runs the stub in this environment, where
sftlab is installed and would hide a missing file; here the folder's model is driven as the stub drives it
(`initialize`, then `execute` on a request) in a Python whose path has no sftlab but the exported one.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

STUB = r"""
import json, sys, types
from pathlib import Path

import numpy as np

version = Path(sys.argv[1])
sys.path[:] = [p for p in sys.path if not (Path(p or ".") / "sftlab").exists()]  # no sftlab installed

pb = types.ModuleType("triton_python_backend_utils")  # the stub's module, as much of it as model.py uses


class Tensor:
    def __init__(self, name, array):
        self.name, self.array = name, array

    def as_numpy(self):
        return self.array


class InferenceResponse:
    def __init__(self, output_tensors=(), error=None):
        self.output_tensors, self.error = list(output_tensors), error


class Request:
    def __init__(self, text, **parameters):
        self.text, self._parameters = text, parameters

    def parameters(self):
        return json.dumps(self._parameters)


pb.Tensor, pb.InferenceResponse, pb.TritonError = Tensor, InferenceResponse, RuntimeError
pb.get_input_tensor_by_name = lambda request, name: Tensor(name, np.array([[request.text.encode()]], dtype=object))
sys.modules[pb.__name__] = pb

import importlib.util

spec = importlib.util.spec_from_file_location("model", version / "model.py")
model = importlib.util.module_from_spec(spec)
spec.loader.exec_module(model)
triton = model.TritonPythonModel()
triton.initialize({"model_config": json.dumps({"parameters": {}})})
messages = [{"role": "user", "content": "Say hi."}]
(response,) = triton.execute([Request(json.dumps(messages), max_tokens=5)])
assert response.error is None, response.error
out = {t.name: t.array.tolist() for t in response.output_tensors}
print(json.dumps({
    "sftlab": sorted({str(Path(m.__file__).resolve()) for n, m in sys.modules.items()
                      if n.split(".")[0] == "sftlab" and getattr(m, "__file__", None)}),
    "stops": sorted(triton.engine.stop_ids),
    "prompt_tokens": out["prompt_tokens"][0][0],
    "completion_tokens": out["completion_tokens"][0][0],
}))
"""


def test_triton_model_folder_runs_without_sftlab_installed(tmp_path, tiny_model_dir, tokenizer):
    from sftlab.export.triton import write_model_code
    from sftlab.serve.generation import encode, stop_token_ids

    version = tmp_path / "sftlab" / "1"
    version.mkdir(parents=True)
    write_model_code(version)
    shutil.copytree(tiny_model_dir, version / "weights")
    done = subprocess.run([sys.executable, "-c", STUB, str(version)], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["sftlab"] and all(Path(f).is_relative_to(version.resolve() / "sftlab") for f in result["sftlab"])
    messages = [{"role": "user", "content": "Say hi."}]
    assert result["stops"] == sorted(stop_token_ids(tokenizer, tokenizer.eos_token_id))
    assert result["prompt_tokens"] == len(encode(tokenizer, messages))
    assert 1 <= result["completion_tokens"] <= 5
