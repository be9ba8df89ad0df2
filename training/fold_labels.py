"""Fold what a student graph computes from its class label alone into lookup tables, and normalisations into them.

A student's conditional BatchNorm computes, per sample, γ(e(y)) and β(e(y)) from the label's embedding through two
Gemms and Unsqueezes, and normalises with a standalone BatchNormalization before scaling and shifting: nine nodes
and three passes over the activation per normalisation, though the label takes one of `classes` values. This pass
evaluates every tensor that depends only on a label input (and constants) for each class once, replaces it by a
Gather from a [classes, …] table, and folds a BatchNormalization whose output is only scaled and shifted by such
tables into the tables themselves: x·a[y] + b[y]. Same function, fewer nodes and passes; the result is checked
against PyTorch by the export's parity check, like every export.
"""
from __future__ import annotations

import itertools

import numpy as np
import onnx
from onnx import helper, numpy_helper

FOLD_PREFIX = "label_table"


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    values = {item.name: numpy_helper.to_array(item) for item in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        elif node.op_type == "Identity" and node.input[0] in values:  # the exporter's alias of a duplicate initializer
            values[node.output[0]] = values[node.input[0]]
    return values


def _label_only(graph: onnx.GraphProto, labels: set[str], constants: dict) -> tuple[list, list]:
    """(nodes whose inputs are label inputs, constants or outputs of such nodes, reaching a label; nodes of constants
    alone, e.g. the Identity the exporter writes for a duplicate initializer), in graph order."""
    label_derived, constant_only = set(labels), set(constants)
    found, constant_nodes = [], []
    for node in graph.node:  # topological order, as ONNX requires
        inputs = [name for name in node.input if name]
        if node.op_type == "Constant" or all(name in constant_only for name in inputs):
            constant_nodes.append(node)
            constant_only.update(node.output)
        elif all(name in label_derived or name in constant_only for name in inputs):
            found.append(node)
            label_derived.update(node.output)
    return found, constant_nodes


def _evaluate(model: onnx.ModelProto, nodes: list, constant_nodes: list, labels: set[str], outputs: list[str],
              classes: int) -> dict[str, np.ndarray]:
    """The label-only tensors for labels 0 … classes-1: the label-only nodes alone, run by onnx's reference
    evaluator (numpy; the tables are tiny)."""
    from onnx.reference import ReferenceEvaluator

    inferred = onnx.shape_inference.infer_shapes(model).graph
    types = {item.name: item for item in [*inferred.value_info, *inferred.output]}
    graph = onnx.helper.make_graph(constant_nodes + nodes, "tables", [i for i in model.graph.input if i.name in labels],
                                   [types[name] for name in outputs], list(model.graph.initializer))
    probe = helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    every_class = np.arange(classes, dtype=np.int64)
    return dict(zip(outputs, ReferenceEvaluator(probe).run(outputs, {label: every_class for label in labels})))


def fold_labels(model: onnx.ModelProto, classes: int) -> onnx.ModelProto:
    """`model` with its label-only subgraphs as Gathers from tables and BatchNormalizations folded into them."""
    graph = model.graph
    labels = {item.name for item in graph.input if item.type.tensor_type.elem_type == onnx.TensorProto.INT64}
    constants = _constants(graph)
    folded, constant_nodes = _label_only(graph, labels, constants)
    folded_outputs = {name for node in folded for name in node.output}
    consumers = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    frontier = sorted({name for name in folded_outputs
                       if any(c not in folded for c in consumers.get(name, [])) or name in
                       {o.name for o in graph.output}})
    producer = {name: node for node in graph.node for name in node.output}
    label_of = {}
    for name in frontier:
        (label_of[name],) = [label for label in labels if _depends_on(producer, name, label)]
    tables = _evaluate(model, folded, constant_nodes, labels, frontier, classes) if frontier else {}
    for name, table in tables.items():
        if table.shape[:1] != (classes,):
            raise ValueError(f"{name}: a label-only tensor without the batch axis first ({table.shape})")
    kept = [node for node in graph.node if node not in folded]
    tables, kept = _fold_normalisations(kept, tables, constants, consumers)
    nodes, initializers = [], [item for item in graph.initializer]
    taken = {item.name for item in initializers}  # a graph folded before already holds tables of that name
    table_names = (n for n in (f"{FOLD_PREFIX}_{i}" for i in itertools.count()) if n not in taken)
    for (name, table), table_name in zip(sorted(tables.items()), table_names):
        initializers.append(numpy_helper.from_array(np.ascontiguousarray(table, np.float32)
                                                    if table.dtype == np.float32 else table, table_name))
        nodes.append(helper.make_node("Gather", [table_name, label_of[name]], [name], axis=0))
    new_graph = helper.make_graph(nodes + kept, graph.name, list(graph.input), list(graph.output), initializers)
    result = helper.make_model(new_graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    return _without_unused(result)


def _depends_on(producer: dict[str, onnx.NodeProto], tensor: str, label: str) -> bool:
    """Whether `tensor` is computed from `label` (`producer`: the node that writes each tensor)."""
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
