"""Export a model or run: merged safetensors, ONNX (KV cache, via onnxruntime-genai), a Triton repository.

Every export verifies itself against the PyTorch model it came from.
"""
