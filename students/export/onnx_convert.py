"""Convert one PyTorch module to ONNX and check it: failures located, fp16 with the overflow check, parity.

Used by ``students.export.deploy`` (the pipeline's three models) and ``benchmarks/deploy_latency.py``:

    component = Component("unet", module, inputs, ("sample", "timestep", "encoder_hidden_states"), ("noise_pred",))
    spec = convert(component, folder, "fp16")     # writes unet.fp16.onnx, checks it against the fp32 module

- ``export_model``: ``torch.onnx.export`` (TorchScript exporter, opset 17); a failure becomes one ``DeployError``
  naming the innermost block that fails alone with the same operator (``locate_failure``).
- ``fp16_component``: a float16 copy in which every module whose fp32 output passes ``FP16_LIMIT`` on the
  example inputs runs in float32 (``kept_fp32`` in deploy.json names them).
- ``parity`` / ``error_bound``: max abs error and max abs error relative to the output's scale, against a
  bound derived from the arithmetic of the precision.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import math
import os
import re
import warnings

from students.export.ondevice import DeployError, ModelSpec, TensorSpec

OPSET = 17  # ONNX Runtime (mobile too) and the Core ML / TFLite converters all read it
FP16_MAX = 65504.0  # largest finite float16
FP16_LIMIT = FP16_MAX / 4  # keep a module fp32 when its fp32 output passes this (headroom for other inputs)
UNIT_ROUNDOFF = {"fp32": 2.0 ** -24, "fp16": 2.0 ** -11}

@dataclasses.dataclass
class Component:
    """One model to export: the wrapper module, example inputs and the names of its inputs and outputs."""

    name: str  # text_encoder | unet | decoder
    module: object  # torch.nn.Module in eval mode, float32
    inputs: tuple  # example tensors (fixed shapes: the exported shapes)
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_batch: bool = False  # the batch axis of every input and output symbolic (benchmarks); else all fixed



# ------------------------------------------------------------------------------------------
# conversion, with failures located
# ------------------------------------------------------------------------------------------


def _flatten(obj, leaves: list):
    """Tensors of nested tuples/lists/dicts -> ``leaves``; returns a template with their indices."""
    import torch

    if torch.is_tensor(obj):
        leaves.append(obj)
        return ("__tensor__", len(leaves) - 1)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_flatten(o, leaves) for o in obj)
    if isinstance(obj, dict):
        return {k: _flatten(v, leaves) for k, v in obj.items()}
    return obj


def _unflatten(template, leaves):
    if isinstance(template, tuple) and len(template) == 2 and template[0] == "__tensor__":
        return leaves[template[1]]
    if isinstance(template, (list, tuple)):
        return type(template)(_unflatten(t, leaves) for t in template)
    if isinstance(template, dict):
        return {k: _unflatten(v, leaves) for k, v in template.items()}
    return template


def _forward_hooked(module, inputs, attach) -> None:
    """One no-grad forward of ``module`` with ``attach(name, submodule) -> hook handle`` on every named
    submodule; the hooks are removed after."""
    import torch

    handles = [attach(name, sub) for name, sub in module.named_modules() if name]
    try:
        with torch.no_grad():
            module(*inputs)
    finally:
        for h in handles:
            h.remove()


def _recorded_calls(module, inputs) -> dict:
    """{submodule name: (args, kwargs)} of each submodule's first call in one forward of ``module``."""
    calls = {}

    def attach(name, sub):
        def hook(mod, args, kwargs):
            calls.setdefault(name, (args, kwargs))
        return sub.register_forward_pre_hook(hook, with_kwargs=True)

    _forward_hooked(module, inputs, attach)
    return calls


def call_module(sub, args, kwargs):
    """(module, tensors): ``sub(*args, **kwargs)`` as a module whose inputs are the tensors found anywhere
    in the arguments (nested lists, dicts), so any converter can take ``sub`` alone."""
    import torch

    leaves: list = []
    template = _flatten((args, kwargs), leaves)

    class Call(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.sub = sub

        def forward(self, *tensors):
            a, kw = _unflatten(template, list(tensors))
            return self.sub(*a, **kw)

    return Call().eval(), tuple(leaves)


def export_onnx_bytes(module, tensors) -> None:
    """ONNX export into memory: the converter ``locate_failure`` tries on each block by default."""
    import torch

    torch.onnx.export(module, tensors, io.BytesIO(), opset_version=OPSET, dynamo=False)


def failed_operator(err: BaseException) -> str | None:
    """The operator an exporter error names (``aten::fft_rfft``), or None."""
    found = re.search(r"operator '?([A-Za-z_]+::[A-Za-z0-9_.]+)'?", str(err))
    return found.group(1) if found else None


def locate_failure(module, inputs, err: BaseException, try_convert=export_onnx_bytes,
                   operator=None) -> tuple[str, str] | None:
    """(block name, class) of the innermost submodule that fails ``try_convert(module, tensors)`` alone with
    the same operator (``operator(error)``, default ``failed_operator``; the same error type when it names
    none), searching down from the top; None if no block fails alone."""
    operator = operator or failed_operator
    op = operator(err)
    calls = _recorded_calls(module, inputs)
    found, scope = None, module
    while True:
        for full, child in _called_children(scope, found[0] if found else "", calls):
            try:
                with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                    warnings.simplefilter("ignore")
                    try_convert(*call_module(child, *calls[full]))
            except Exception as child_err:  # noqa: BLE001 (any converter failure of the child is a lead)
                if (operator(child_err) == op) if op else type(child_err) is type(err):
                    found, scope = (full, type(child).__name__), child
                    break
        else:
            return found


def _called_children(scope, prefix: str, calls: dict):
    """(name, module) of the nearest submodules of ``scope`` that were called (looking through ModuleLists)."""
    for name, child in scope.named_children():
        full = f"{prefix}.{name}" if prefix else name
        if full in calls:
            yield full, child
        else:
            yield from _called_children(child, full, calls)


def export_model(component: Component, path: str) -> None:
    """``torch.onnx.export`` of one component; a failure is one ``DeployError`` naming the block and operator."""
    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer and deprecation warnings about the TorchScript exporter
            axes = {n: {0: "batch"} for n in component.input_names + component.output_names} if component.dynamic_batch else None
            torch.onnx.export(component.module, component.inputs, path, input_names=list(component.input_names),
                              output_names=list(component.output_names), opset_version=OPSET, dynamo=False,
                              dynamic_axes=axes)
    except Exception as err:  # noqa: BLE001 (a converter failure of any kind becomes one message naming the block)
        op = failed_operator(err) or f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"
        where = locate_failure(component.module, component.inputs, err)
        block = f"block {where[0]} ({where[1]})" if where else "a block that converts alone (the failure is in how blocks connect)"
        raise DeployError(f"cannot convert the {component.name} to ONNX (opset {OPSET}): {block} uses {op}, which the "
                          "exporter does not support; replace that operator in the block or export another format") from None


# ------------------------------------------------------------------------------------------
# fp16 with the overflow check
# ------------------------------------------------------------------------------------------


def output_peaks(module, inputs) -> dict[str, float]:
    """{submodule name: max |output|} over one fp32 forward (floating tensors of the output only)."""
    peaks = {}

    def peak(obj) -> float:
        leaves: list = []
        _flatten(obj, leaves)
        return max((float(t.detach().abs().max()) for t in leaves if t.is_floating_point() and t.numel()), default=0.0)

    def attach(name, sub):
        def hook(mod, args, out):
            peaks[name] = max(peaks.get(name, 0.0), peak(out))
        return sub.register_forward_hook(hook)

    _forward_hooked(module, inputs, attach)
    return peaks


def overflowing(module, inputs, limit: float = FP16_LIMIT) -> tuple[list[tuple[str, float]], list[str]]:
    """(tensors, blocks): the submodule outputs whose fp32 value passes ``limit`` with their peaks, and the
    blocks to keep in fp32 for them: for each, its innermost enclosing module whose own output fits
    (``""``, the whole model, when none does). A block's output stays fp16 between blocks, so keeping only
    the overflowing module would overflow again on its way out."""
    import torch

    peaks = output_peaks(module, inputs)
    with torch.no_grad():
        out = module(*inputs)
    peaks[""] = max(float(t.abs().max()) for t in (out if isinstance(out, (tuple, list)) else (out,)))
    fits = {n for n, p in peaks.items() if p <= limit}
    over = sorted((n, p) for n, p in peaks.items() if n not in fits)
    keep = set()
    for name, _ in over:
        parts = name.split(".")
        ancestors = [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]
        keep.add(next((a for a in ancestors if a in fits), ""))
    keep = sorted(k for k in keep if k == "" or not any(k.startswith(o + ".") or o == "" for o in keep if o != k))
    return over, keep


def _cast(obj, dtype):
    leaves: list = []
    template = _flatten(obj, leaves)
    return _unflatten(template, [t.to(dtype) if t.is_floating_point() else t for t in leaves])


def fp16_module(module, keep: list[str]):
    """A float16 copy of ``module`` with the submodules named in ``keep`` run in float32 (inputs cast up, outputs down)."""
    import torch

    class KeepFloat32(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args, **kwargs):
            args, kwargs = _cast((args, kwargs), torch.float32)
            return _cast(self.inner(*args, **kwargs), torch.float16)

    half = copy.deepcopy(module).half()
    for name in keep:
        parent_name, _, child = name.rpartition(".")
        parent = half.get_submodule(parent_name) if parent_name else half
        setattr(parent, child, KeepFloat32(copy.deepcopy(module.get_submodule(name)).float()))
    return half


def fp16_component(component: Component) -> tuple[Component, list[tuple[str, float]], list[str]]:
    """The fp16 variant of ``component``, the tensors that overflow fp16 and the blocks kept in fp32 for
    them (``overflowing``; the whole model when its own output overflows)."""
    over, keep = overflowing(component.module, component.inputs)
    if "" in keep:
        return component, over, [""]
    inputs = tuple(t.half() if t.is_floating_point() and name != "timestep" else t
                   for t, name in zip(component.inputs, component.input_names))
    return dataclasses.replace(component, module=fp16_module(component.module, keep).eval(), inputs=inputs), over, keep


# ------------------------------------------------------------------------------------------
# parity
# ------------------------------------------------------------------------------------------


def error_bound(module, precision: str) -> float:
    """Bound on max |onnx - torch| / max |torch| for one forward, from the arithmetic of the precision.

    Rounding errors of unit roundoff u add like a random walk; the bound is 8 standard deviations of it.
    fp32 (both sides accumulate in fp32, in different orders): one error per multiply-add behind an output,
    so 8 u sqrt(sum K) over the Linear/Conv layers (K = reduction length). fp16 against the fp32 module
    (weights and every layer output rounded to fp16; onnxruntime accumulates in fp32): about three
    roundings per layer of Linear/Conv/normalisation on the way, so 8 u sqrt(3 L), plus the fp32 bound."""
    import torch

    reduction, layers = 0, 0
    for m in module.modules():
        if isinstance(m, torch.nn.Linear):
            reduction, layers = reduction + m.in_features, layers + 1
        elif isinstance(m, torch.nn.Conv2d):
            reduction += m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
            layers += 1
        elif isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
            layers += 1
    bound = 8 * UNIT_ROUNDOFF["fp32"] * math.sqrt(max(reduction, 1))
    if precision == "fp16":
        bound += 8 * UNIT_ROUNDOFF["fp16"] * math.sqrt(3 * max(layers, 1))
    return bound


def session(path: str, threads: int = 1):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def parity(sess, component: Component, reference: Component | None = None) -> list[tuple[str, float, float]]:
    """[(output, max abs error, max abs error / max |reference|)] of the ONNX model against ``reference``
    (default: ``component``'s own PyTorch module, in float32) on ``component``'s inputs."""
    import numpy as np
    import torch

    ref = reference or component
    feeds = {n: t.numpy() for n, t in zip(component.input_names, component.inputs)}
    got = sess.run(list(component.output_names), feeds)
    with torch.no_grad():
        want = ref.module(*ref.inputs)
    want = want if isinstance(want, (tuple, list)) else (want,)
    rows = []
    for name, g, w in zip(component.output_names, got, want):
        g, w = g.astype(np.float64), w.double().numpy()
        if not np.isfinite(g).all():
            rows.append((name, math.inf, math.inf))
            continue
        err = float(np.abs(g - w).max())
        rows.append((name, err, err / max(float(np.abs(w).max()), 1e-30)))
    return rows


def tensor_specs(names, tensors) -> tuple[TensorSpec, ...]:
    dtypes = {"torch.float32": "float32", "torch.float16": "float16", "torch.int64": "int64", "torch.int32": "int32"}
    return tuple(TensorSpec(name=n, shape=tuple(t.shape), dtype=dtypes[str(t.dtype)]) for n, t in zip(names, tensors))


def convert(component: Component, folder: str, precision: str) -> ModelSpec:
    """Export one component at one precision into ``folder``, check its parity, and describe it."""
    import torch

    fp32 = component
    over, keep = [], []
    if precision == "fp16":
        component, over, keep = fp16_component(component)
        if keep == [""]:  # the model's own output passes fp16's range: its fp16 variant is the fp32 model
            precision = "fp32"
    file = f"{component.name}.{precision}.onnx"
    if not os.path.exists(os.path.join(folder, file)):  # (a fp16 variant that is the fp32 model reuses its file)
        export_model(component, os.path.join(folder, file))
    rows = parity(session(os.path.join(folder, file)), component, fp32)
    bound = error_bound(fp32.module, precision)
    for name, err, rel in rows:
        if not rel <= bound:
            where = f"; kept in fp32: {keep}" if keep else ""
            raise DeployError(f"{precision} {component.name} output {name!r} differs from PyTorch by {err:.3g} "
                              f"({rel:.3g} of its scale; bound {bound:.3g}){where}: not exported")
    with torch.no_grad():
        out = component.module(*component.inputs)
    out = out if isinstance(out, (tuple, list)) else (out,)
    return ModelSpec(file=file, inputs=tensor_specs(component.input_names, component.inputs),
                     outputs=tensor_specs(component.output_names, out), kept_fp32=tuple(keep),
                     overflows=tuple(over), parity=tuple((n, e, r, bound) for n, e, r in rows))
