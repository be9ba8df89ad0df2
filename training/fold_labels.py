"""Fold what a student graph computes from its class label alone into lookup tables, and normalisations into them.

A student's conditional BatchNorm computes, per sample, γ(e(y)) and β(e(y)) from the label's embedding through two
Gemms and Unsqueezes, and normalises with a standalone BatchNormalization before scaling and shifting: nine nodes
and three passes over the activation per normalisation, though the label takes one of `classes` values. This pass
evaluates every tensor that depends only on a label input (and constants) for each class once, replaces it by a
Gather from a [classes, …] table, and folds a BatchNormalization whose output is only scaled and shifted by such
tables into the tables themselves: x·a[y] + b[y]. Same function, fewer nodes and passes; the result is checked
against the original graph by the caller (training.export.check_graphs_agree).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

FOLD_PREFIX = "label_table"


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    values = {item.name: numpy_helper.to_array(item) for item in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def _label_only(graph: onnx.GraphProto, labels: set[str], constants: dict) -> list[onnx.NodeProto]:
    """Nodes whose every input is a label input, a constant, or the output of another such node (not Constants)."""
    known, found = set(labels) | set(constants), []
    for node in graph.node:  # topological order, as ONNX requires
        if node.op_type != "Constant" and all(name in known for name in node.input if name):
            if any(name in labels or name not in constants for name in node.input if name):
                found.append(node)
                known.update(node.output)
            elif all(name in constants for name in node.input if name):
                known.update(node.output)  # constant-only: left to onnxruntime's own constant folding
    return found


def _evaluate(model: onnx.ModelProto, nodes: list, labels: set[str], outputs: list[str],
              classes: int) -> dict[str, np.ndarray]:
    """The label-only tensors for labels 0 … classes-1, by onnxruntime on the label-only nodes alone."""
    import onnxruntime as ort

    constants = [node for node in model.graph.node if node.op_type == "Constant"]
    inferred = onnx.shape_inference.infer_shapes(model).graph
    types = {item.name: item for item in [*inferred.value_info, *inferred.output]}
    graph = onnx.helper.make_graph(constants + nodes, "tables", [i for i in model.graph.input if i.name in labels],
                                   [types[name] for name in outputs], list(model.graph.initializer))
    probe = helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3  # the probe leaves most initializers unused, and onnxruntime would list each
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    every_class = np.arange(classes, dtype=np.int64)
    return dict(zip(outputs, session.run(outputs, {label: every_class for label in labels})))


def fold_labels(model: onnx.ModelProto, classes: int) -> onnx.ModelProto:
    """`model` with its label-only subgraphs as Gathers from tables and BatchNormalizations folded into them."""
    graph = model.graph
    labels = {item.name for item in graph.input if item.type.tensor_type.elem_type == onnx.TensorProto.INT64}
    constants = _constants(graph)
    folded = _label_only(graph, labels, constants)
    folded_outputs = {name for node in folded for name in node.output}
    consumers = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    frontier = sorted({name for name in folded_outputs
                       if any(c not in folded for c in consumers.get(name, [])) or name in
                       {o.name for o in graph.output}})
    label_of = {}
    for name in frontier:
        (label_of[name],) = [label for label in labels if _depends_on(graph, name, label)]
    tables = _evaluate(model, folded, labels, frontier, classes) if frontier else {}
    for name, table in tables.items():
        if table.shape[:1] != (classes,):
            raise ValueError(f"{name}: a label-only tensor without the batch axis first ({table.shape})")
    kept = [node for node in graph.node if node not in folded]
    tables, kept = _fold_normalisations(kept, tables, constants, consumers)
    nodes, initializers = [], [item for item in graph.initializer]
    for index, (name, table) in enumerate(sorted(tables.items())):
        table_name = f"{FOLD_PREFIX}_{index}"
        initializers.append(numpy_helper.from_array(np.ascontiguousarray(table, np.float32)
                                                    if table.dtype == np.float32 else table, table_name))
        nodes.append(helper.make_node("Gather", [table_name, label_of[name]], [name], axis=0))
    new_graph = helper.make_graph(nodes + kept, graph.name, list(graph.input), list(graph.output), initializers)
    result = helper.make_model(new_graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    return _without_unused(result)


def _depends_on(graph: onnx.GraphProto, tensor: str, label: str) -> bool:
    producer = {name: node for node in graph.node for name in node.output}
    stack, seen = [tensor], set()
    while stack:
        name = stack.pop()
        if name == label:
            return True
        if name in seen or name not in producer:
            continue
        seen.add(name)
        stack.extend(producer[name].input)
    return False


def _fold_normalisations(nodes: list, tables: dict, constants: dict, consumers: dict) -> tuple[dict, list]:
    """BatchNormalization(x) → Mul(·, a[y]) → Add(·, b[y]), each output used once: x·(a·s)[y] + (b + a·t)[y] with
    the normalisation's s = scale/√(var+ε), t = bias − mean·s."""
    by_output = {name: node for node in nodes for name in node.output}
    removed = set()
    for node in nodes:
        if node.op_type != "BatchNormalization" or len(consumers.get(node.output[0], [])) != 1:
            continue
        (mul,) = consumers[node.output[0]]
        if mul.op_type != "Mul" or len(consumers.get(mul.output[0], [])) != 1:
            continue
        (add,) = consumers[mul.output[0]]
        scale_name = next((name for name in mul.input if name != node.output[0]), None)
        shift_name = next((name for name in add.input if name != mul.output[0]), None)
        if add.op_type != "Add" or scale_name not in tables or shift_name not in tables:
            continue
        epsilon = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        scale, bias, mean, var = (constants[name] for name in node.input[1:5])
        s = scale / np.sqrt(var + epsilon)
        t = bias - mean * s
        shape = (1, -1) + (1,) * (tables[scale_name].ndim - 2)
        a, b = tables[scale_name], tables[shift_name]
        tables[shift_name] = (b + a * t.reshape(shape)).astype(np.float32)
        tables[scale_name] = (a * s.reshape(shape)).astype(np.float32)
        mul.input[list(mul.input).index(node.output[0])] = node.input[0]
        removed.add(id(node))
    del by_output
    return tables, [node for node in nodes if id(node) not in removed]


def _without_unused(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop nodes and initializers no output depends on."""
    graph = model.graph
    needed = {item.name for item in graph.output}
    kept = []
    for node in reversed(list(graph.node)):
        if any(name in needed for name in node.output):
            kept.append(node)
            needed.update(name for name in node.input if name)
    initializers = [item for item in graph.initializer if item.name in needed]
    new_graph = helper.make_graph(list(reversed(kept)), graph.name, list(graph.input), list(graph.output),
                                  initializers)
    return helper.make_model(new_graph, opset_imports=model.opset_import, ir_version=model.ir_version)
