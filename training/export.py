"""ONNX export of the students (one graph per mechanism plus one fused graph) with an onnxruntime parity check.

Inputs are `z` float32 [B, Z] (the teacher's own noise) and `y` int64 [B]; the batch axis is dynamic.
The fused graph runs all three students in one session (cheaper than three sessions on CPU); its inputs
are `z_<mechanism>` and `y_<mechanism>` and its outputs `mask`, `texture`, `background`. Composition is
not in the graph: it stays in core.compose.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from core.manifest import VALUE_RANGES
from training.fold_labels import fold_labels
from training.students import HEADS, TinyGenerator

PARITY_TOLERANCE = 1e-4
PARITY_BATCH = 16
PARITY_SECOND_BATCH = 3
OPSET = 17


class ParityError(RuntimeError):
    """onnxruntime disagrees with PyTorch beyond the tolerance: the export must not ship."""


class FusedStudents(nn.Module):
    def __init__(self, students: dict[str, TinyGenerator]):
        super().__init__()
        self.shape, self.texture, self.background = students["shape"], students["texture"], students["background"]

    def forward(self, z_shape, y_shape, z_texture, y_texture, z_background, y_background):
        return self.shape(z_shape, y_shape), self.texture(z_texture, y_texture), self.background(z_background, y_background)


def export_graph(module: nn.Module, inputs: tuple, input_names: list[str], output_names: list[str], path: Path,
                 label_classes: int | None = None) -> None:
    """Trace `module` on `inputs` into an ONNX graph whose batch axis stays dynamic; with `label_classes`, what the
    graph computes from its labels alone becomes lookup tables (training.fold_labels)."""
    dynamic_axes = {name: {0: "batch"} for name in input_names + output_names}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, inputs, str(path), input_names=input_names, output_names=output_names,
            dynamic_axes=dynamic_axes, opset_version=OPSET, dynamo=False,
        )
    if label_classes:
        import onnx

        onnx.save(fold_labels(onnx.load(str(path)), label_classes), str(path))


def check_parity(path: Path, module: nn.Module, feeds: dict[str, np.ndarray], output_names: list[str],
                 sizes: tuple[int, int] = (PARITY_BATCH, PARITY_SECOND_BATCH)) -> float:
    """Max |onnxruntime − PyTorch| over the export batch and a smaller one (`sizes`; feeds hold the first).

    The second batch size catches a graph whose batch axis was frozen at trace time, which a check at the
    traced size alone would pass.
    """
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    diff = 0.0
    for size in sizes:
        batch = {name: value[:size] for name, value in feeds.items()}
        try:
            onnx_outputs = session.run(output_names, batch)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ParityError(f"{path.name}: onnxruntime fails at batch {size}: {exc}") from exc
        with torch.no_grad():
            torch_outputs = module(*(torch.from_numpy(value) for value in batch.values()))
        if isinstance(torch_outputs, torch.Tensor):
            torch_outputs = (torch_outputs,)
        diff = max([diff] + [float(np.abs(o - t.numpy()).max()) for o, t in zip(onnx_outputs, torch_outputs)])
    if not diff <= PARITY_TOLERANCE:
        raise ParityError(f"{path.name}: onnxruntime differs from PyTorch by {diff:.2e} (> {PARITY_TOLERANCE:g})")
    return diff


def tensor_spec(dtype: str, shape: list, value_range: list | None = None) -> dict:
    spec = {"dtype": dtype, "shape": shape}
    if value_range is not None:
        spec["range"] = value_range
    return spec


def export_students(students: dict[str, TinyGenerator], out_dir: str | os.PathLike, seed: int = 0,
                    fold: bool = False) -> dict:
    """Write <mechanism>.onnx for each student (and fused.onnx when all three are present); `fold`: with the label
    lookups folded into tables (an exact rewrite, parity-checked like every export).

    Returns the manifest's `mechanisms` and `fused` blocks, including the measured parity. Raises
    ParityError if any graph disagrees with PyTorch on a batch of PARITY_BATCH.
    """
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    blocks: dict = {"mechanisms": {}, "fused": None}
    feeds_all = {}
    for mechanism, student in students.items():
        student = student.eval()
        config = student.config
        output_name = HEADS[mechanism][0]
        z = rng.standard_normal((PARITY_BATCH, config.z_dim)).astype(np.float32)
        y = rng.integers(0, config.n_classes, PARITY_BATCH).astype(np.int64)
        feeds_all[mechanism] = (z, y)
        path = out_dir / f"{mechanism}.onnx"
        export_graph(student, (torch.from_numpy(z), torch.from_numpy(y)), ["z", "y"], [output_name], path,
                     config.n_classes if fold else None)
        diff = check_parity(path, student, {"z": z, "y": y}, [output_name])
        channels = HEADS[mechanism][1]
        blocks["mechanisms"][mechanism] = {
            "file": path.name,
            "inputs": {
                "z": tensor_spec("float32", [None, config.z_dim]),
                "y": tensor_spec("int64", [None], [0, config.n_classes - 1]),
            },
            "outputs": {
                output_name: tensor_spec("float32", [None, channels, config.image_size, config.image_size],
                                         list(VALUE_RANGES[output_name]))
            },
            "parameters": sum(p.numel() for p in student.parameters()),
            "parity_max_abs_diff": diff,
        }
    if set(students) == set(HEADS):
        fused = FusedStudents(students).eval()
        names, values = [], []
        for mechanism in HEADS:
            names += [f"z_{mechanism}", f"y_{mechanism}"]
            values += list(feeds_all[mechanism])
        path = out_dir / "fused.onnx"
        outputs = [HEADS[m][0] for m in HEADS]
        classes = students["shape"].config.n_classes
        export_graph(fused, tuple(torch.from_numpy(v) for v in values), names, outputs, path, classes if fold else None)
        diff = check_parity(path, fused, dict(zip(names, values)), outputs)
        blocks["fused"] = {
            "file": path.name,
            "inputs": {
                name: (blocks["mechanisms"][name.split("_", 1)[1]]["inputs"][name.split("_", 1)[0]]) for name in names
            },
            "outputs": {name: blocks["mechanisms"][m]["outputs"][name] for m, name in zip(HEADS, outputs)},
            # Which fused input and output belongs to which mechanism: runtimes read names from here.
            "bindings": {m: {"z": f"z_{m}", "y": f"y_{m}", "output": HEADS[m][0]} for m in HEADS},
            "parity_max_abs_diff": diff,
        }
    return blocks
