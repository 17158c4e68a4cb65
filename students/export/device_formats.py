"""ExecuTorch and Core ML conversion of one component, behind ``distill export --format executorch|coreml``.

    spec = to_executorch(component, folder, "fp32")   # unet.fp32.pte, lowered to XNNPACK, run here for parity
    spec = to_coreml(component, folder, "fp16")       # unet.fp16.mlpackage, checked with coremltools' spec only

Neither package is a dependency (``pip install 'diffusion-distill[devices]'``): their newest releases,
executorch 1.5.1 and coremltools 9.0, convert and (ExecuTorch) run with torch 2.14.1 on this machine,
but coremltools 9.0 declares torch 2.7.0 as the newest it supports and executorch pulls pinned
packages (torchao 0.18, mpmath 1.3.0, ...). ``check_available`` turns a missing one into one line.

- ExecuTorch: ``torch.export.export`` -> ``to_edge_transform_and_lower`` with the XNNPACK partitioner ->
  ``.pte``; parity is measured in ExecuTorch's own runtime (``portable_lib``) against the PyTorch module.
- Core ML: ``torch.export`` (else ``torch.jit.trace``) -> ``coremltools.convert`` to an ML program (iOS 16,
  fp32 or fp16 compute; inputs float32 and int32 token ids).
  Core ML models run only on Apple hardware, so off it the check is coremltools' own: the saved
  package's spec must name the inputs and outputs with the exported shapes. No parity is measured.

A conversion failure is one ``DeployError`` naming the innermost block that fails alone and the
operator (``onnx_convert.locate_failure`` with this format's converter).
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import re
import warnings

from students.export.ondevice import DeployError, ModelSpec
from students.export.onnx_convert import Component, error_bound, fp16_component, locate_failure, tensor_specs

PACKAGES = {"executorch": ("executorch", "executorch==1.5.1"), "coreml": ("coremltools", "coremltools==9.0")}
COREML_TARGET = "iOS16"  # ML programs with fp16 compute need iOS 16 / macOS 13


def check_available(fmt: str) -> None:
    """``DeployError`` in one line when ``fmt``'s converter is not installed."""
    module, requirement = PACKAGES[fmt]
    if importlib.util.find_spec(module) is None:
        raise DeployError(f"--format {fmt} needs {requirement} (tested with torch 2.14.1), which is not installed: "
                          f"pip install --constraint <(echo torch==2.14.1) {requirement}, or use --format onnx")


def failed_operator(err: BaseException) -> str | None:
    """The operator a converter error names (``aten.fft_fft``, ``aten::fft_fft``, ``'fft_fft'``), or None."""
    found = re.search(r"(aten[.:]{1,2}[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)?)", str(err))
    if found:
        return found.group(1)
    found = re.search(r"converting '([A-Za-z0-9_]+)' op|Unsupported fx node ([A-Za-z0-9_]+)", str(err))  # coremltools
    return f"op '{found.group(1) or found.group(2)}'" if found else None


def _raise_located(component: Component, fmt: str, err: BaseException, try_convert) -> None:
    op = failed_operator(err) or f"{type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''}"
    where = locate_failure(component.module, component.inputs, err, try_convert=try_convert, operator=failed_operator)
    block = f"block {where[0]} ({where[1]})" if where else "a block that converts alone (the failure is in how blocks connect)"
    raise DeployError(f"cannot convert the {component.name} to {fmt}: {block} uses {op}, which the converter "
                      "does not support; replace that operator in the block or export another format") from None


# ------------------------------------------------------------------------------------------
# ExecuTorch
# ------------------------------------------------------------------------------------------


def executorch_program(module, inputs):
    import torch
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = torch.export.export(module, tuple(inputs))
        return to_edge_transform_and_lower(exported, partitioner=[XnnpackPartitioner()]).to_executorch()


def to_executorch(component: Component, folder: str, precision: str) -> ModelSpec:
    """``<name>.<precision>.pte`` lowered to XNNPACK, with its parity in ExecuTorch's runtime."""
    import numpy as np
    import torch
    from executorch.extension.pybindings.portable_lib import _load_for_executorch_from_buffer

    fp32, over, keep = component, [], []
    if precision == "fp16":
        component, over, keep = fp16_component(component)
    try:
        program = executorch_program(component.module, component.inputs)
    except Exception as err:  # noqa: BLE001 (a converter failure of any kind becomes one message naming the block)
        _raise_located(component, "ExecuTorch", err, executorch_program)
    file = f"{component.name}.{precision}.pte"
    with open(os.path.join(folder, file), "wb") as f:
        f.write(program.buffer)
    buffer = program.buffer  # the runtime reads this memory: it must outlive ``runtime``
    runtime = _load_for_executorch_from_buffer(buffer)
    got = runtime.forward(tuple(component.inputs))[0]
    with torch.no_grad():
        want = fp32.module(*fp32.inputs)
    g, w = got.double().numpy(), want.double().numpy()
    err = float(np.abs(g - w).max()) if np.isfinite(g).all() else math.inf
    rel, bound = err / max(float(np.abs(w).max()), 1e-30), error_bound(fp32.module, precision)
    if not rel <= bound:
        raise DeployError(f"{precision} {component.name} in ExecuTorch differs from PyTorch by {err:.3g} "
                          f"({rel:.3g} of its scale; bound {bound:.3g}): not exported")
    return ModelSpec(file=file, inputs=tensor_specs(component.input_names, component.inputs),
                     outputs=tensor_specs(component.output_names, (got,)), kept_fp32=tuple(keep), overflows=tuple(over),
                     parity=((component.output_names[0], err, rel, bound),))


# ------------------------------------------------------------------------------------------
# Core ML
# ------------------------------------------------------------------------------------------


def _coreml_model(module, inputs, names, outputs, precision: str):
    import coremltools as ct
    import numpy as np
    import torch

    names = names or [f"input_{i}" for i in range(len(inputs))]
    log, logger = _Records(), logging.getLogger("coremltools")  # it names the failing op only in its log
    logger.addHandler(log)
    logger.propagate = False  # the op goes into our one-line message instead
    try:
        return _convert_coreml(ct, np, torch, module, inputs, names, outputs, precision)
    except Exception as err:  # noqa: BLE001 (re-raised with the op coremltools logged)
        ops = [m.strip() for m in log.messages if "converting '" in m]
        if not ops:
            raise
        raise RuntimeError(f"{ops[-1]}: {type(err).__name__}: {err}") from None
    finally:
        logger.removeHandler(log)
        logger.propagate = True


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _convert_coreml(ct, np, torch, module, inputs, names, outputs, precision):
    """coremltools from ``torch.export`` (its newer frontend), else from ``torch.jit.trace``: with torch 2.14
    each fails on some blocks the other converts (traced Python ints in attention reshapes; alias nodes
    in CLIP's embeddings). The first error is raised when both fail."""
    types = [ct.TensorType(name=n, shape=tuple(t.shape), dtype=np.int32 if not t.is_floating_point() else np.float32)
             for n, t in zip(names, inputs)]
    named = {"outputs": [ct.TensorType(name=o) for o in outputs]} if outputs else {}
    kwargs = dict(inputs=types, convert_to="mlprogram", minimum_deployment_target=getattr(ct.target, COREML_TARGET),
                  compute_precision=ct.precision.FLOAT16 if precision == "fp16" else ct.precision.FLOAT32, **named)
    first = None
    for frontend in ("export", "trace"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if frontend == "export":
                    graph = torch.export.export(module, tuple(inputs)).run_decompositions({})
                else:
                    graph = torch.jit.trace(module, tuple(inputs))
                return ct.convert(graph, **kwargs)
        except Exception as err:  # noqa: BLE001 (the other frontend may convert it; the first error is kept)
            first = first or err
    raise first


def to_coreml(component: Component, folder: str, precision: str) -> ModelSpec:
    """``<name>.<precision>.mlpackage`` (fp32 or fp16 compute, fp32 inputs), checked by its spec."""
    import torch

    names, outputs = list(component.input_names), list(component.output_names)
    try:
        model = _coreml_model(component.module, component.inputs, names, outputs, precision)
    except Exception as err:  # noqa: BLE001 (a converter failure of any kind becomes one message naming the block)
        _raise_located(component, "Core ML", err, lambda sub, tensors: _coreml_model(sub, tensors, None, None, precision))
    spec = model.get_spec()
    with torch.no_grad():
        out = component.module(*component.inputs)
    got_in = {i.name: tuple(i.type.multiArrayType.shape) for i in spec.description.input}
    got_out = [o.name for o in spec.description.output]
    want_in = {n: tuple(t.shape) for n, t in zip(names, component.inputs)}
    if got_in != want_in or got_out != outputs:
        raise DeployError(f"Core ML {component.name}: the converted spec has inputs {got_in} and outputs {got_out}, "
                          f"expected {want_in} and {outputs}")
    file = f"{component.name}.{precision}.mlpackage"
    model.save(os.path.join(folder, file))
    return ModelSpec(file=file, inputs=tensor_specs(names, [t if t.is_floating_point() else t.int() for t in component.inputs]),
                     outputs=tensor_specs(outputs, (out,)), parity=())
