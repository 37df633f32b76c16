"""Predicted beside measured: the planner's memory and roofline numbers (shared/planner) for every measured
candidate of a build, added to report.json as `candidates[].predicted`.

A prediction needs the decoder's shape (layers, width, KV heads), so only causal-LM builds get one; a model
the planner cannot read (a CNN, an ONNX file) gets none and the report says nothing rather than guessing.
"""
from __future__ import annotations

import logging
from typing import Any

from shared.errors import EdgeforgeError
from shared.planner import ModelShape
from shared.planner.plan import predict_candidate

log = logging.getLogger(__name__)


def model_shape(store, reference_model: str) -> ModelShape | None:
    """The reference model's shape, read from its bundle in the store; None when it is not a decoder."""
    if not reference_model:
        return None
    try:
        shape = ModelShape.from_path(store.path(reference_model.removeprefix("artifacts/")))
    except EdgeforgeError as error:
        log.info("no predictions for %s: %s", reference_model, error.message)
        return None
    return shape if shape.layers and shape.hidden else None


def add_predictions(document: dict[str, Any], shape: ModelShape | None) -> int:
    """Sets `predicted` on every measured candidate row of `document`; returns how many it set."""
    if shape is None or document.get("task") != "causal_lm":
        return 0
    bench = document.get("benchmark", {})
    prompt, generation = int(bench.get("prompt_tokens") or 0), int(bench.get("generation_tokens") or 0)
    added = 0
    for device in document["devices"]:
        for row in device["candidates"]:
            if row["status"] == "failed" or row["size_bytes"] <= 0:
                continue
            try:
                row["predicted"] = predict_candidate(shape, size_bytes=row["size_bytes"],
                                                     attributes=device["attributes"], prompt_tokens=max(prompt, 1),
                                                     generation_tokens=max(generation, 1))
            except EdgeforgeError as error:
                log.info("no prediction for %s on %s: %s", row["id"], device["target"], error.message)
                continue
            added += 1
    return added
