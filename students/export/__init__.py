"""Deployment: the diffusers folder (``folder``), ONNX (``onnx_convert``, ``deploy``), ExecuTorch and
Core ML (``device_formats``) and the torch-free generator (``ondevice``)."""
