"""Pipeline step validation (services/compressor/steps.py): what the coordinator refuses at CreateBuild."""
from __future__ import annotations

import pytest

from edgeforge.v1 import common_pb2
from services.compressor.steps import (CAUSAL_LM, IMAGE_CLASSIFICATION, TEXT_EMBEDDING, DistillStep, PruneStep,
                                       QatStep, pipeline_from_protos, step_from_proto, step_to_proto)
from shared.errors import InvalidArgument

INT4 = common_pb2.QuantizationConfig(method=common_pb2.QUANT_METHOD_RTN, bits=4,
                                     granularity=common_pb2.GRANULARITY_PER_CHANNEL)
INT8 = common_pb2.QuantizationConfig(method=common_pb2.QUANT_METHOD_RTN, bits=8,
                                     granularity=common_pb2.GRANULARITY_PER_CHANNEL)


def prune(**fields) -> common_pb2.CompressionStep:
    return common_pb2.CompressionStep(prune=common_pb2.PruneConfig(**fields))


def distill(**fields) -> common_pb2.CompressionStep:
    return common_pb2.CompressionStep(distill=common_pb2.DistillConfig(**fields))


def qat(**fields) -> common_pb2.CompressionStep:
    return common_pb2.CompressionStep(qat=common_pb2.QatConfig(**fields))


def quantize(config=INT8) -> common_pb2.CompressionStep:
    return common_pb2.CompressionStep(quantize=config)


def refused(steps, task=IMAGE_CLASSIFICATION) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as caught:
        pipeline_from_protos(steps, task, "candidates[0].steps")
    return caught.value


def test_seed_order_structured_then_distill_then_quantize():
    pipeline = pipeline_from_protos([prune(method=common_pb2.PRUNE_METHOD_STRUCTURED, sparsity=0.25),
                                     distill(temperature=2), quantize()], IMAGE_CLASSIFICATION, "steps")
    assert [s.kind for s in pipeline.transforms] == ["prune", "distill"]
    assert pipeline.quantize.grid().name == "int8/per_channel/sym"
    assert pipeline.transforms[0] == PruneStep("structured", 0.25)
    assert pipeline.transforms[1].resolved_alpha(IMAGE_CLASSIFICATION) == 0.5
    assert pipeline.transforms[1].resolved_alpha(TEXT_EMBEDDING) == 1.0


def test_order_violations_name_the_step():
    error = refused([distill(), prune(method=common_pb2.PRUNE_METHOD_MAGNITUDE, sparsity=0.5)])
    assert error.field == "candidates[0].steps[1]" and "prune → distill" in error.message
    error = refused([quantize(), distill()])
    assert error.field == "candidates[0].steps[0]" and "last step" in error.message


def test_n_m_sets_the_sparsity_and_is_checked():
    pipeline = pipeline_from_protos([prune(method=common_pb2.PRUNE_METHOD_SPARSEGPT, n=2, m=4)], CAUSAL_LM, "s")
    assert pipeline.transforms[0].sparsity == 0.5 and pipeline.transforms[0].describe() == "sparsegpt 2:4"
    assert refused([prune(method=common_pb2.PRUNE_METHOD_WANDA, n=4, m=4)]).field.endswith("prune.n")
    assert refused([prune(method=common_pb2.PRUNE_METHOD_STRUCTURED, n=2, m=4)]).field.endswith("prune.n")


@pytest.mark.parametrize("fields, where", [
    ({"method": common_pb2.PRUNE_METHOD_MAGNITUDE, "sparsity": 1.0}, "prune.sparsity"),
    ({"method": common_pb2.PRUNE_METHOD_MAGNITUDE, "sparsity": float("nan")}, "prune.sparsity"),
    ({"sparsity": 0.5}, "prune.method"),
    ({"method": common_pb2.PRUNE_METHOD_WANDA, "sparsity": 0.5, "scope": common_pb2.PRUNE_SCOPE_GLOBAL},
     "prune.scope"),
    ({"method": common_pb2.PRUNE_METHOD_WANDA, "sparsity": 0.5, "unit": common_pb2.STRUCTURED_UNIT_HEADS},
     "prune.unit"),
    ({"method": common_pb2.PRUNE_METHOD_MAGNITUDE, "sparsity": 0.9, "schedule": [0.5, 0.8]}, "prune.schedule"),
    ({"method": common_pb2.PRUNE_METHOD_MAGNITUDE, "sparsity": 0.8, "schedule": [0.8, 0.5]}, "prune.schedule"),
    ({"method": common_pb2.PRUNE_METHOD_MAGNITUDE, "sparsity": 0.8, "schedule": [0.5, 0.8]}, "prune.finetune"),
    ({"method": common_pb2.PRUNE_METHOD_WANDA, "sparsity": 0.8, "schedule": [0.5, 0.8],
      "finetune": common_pb2.TrainingConfig(steps=10)}, "prune.schedule"),
])
def test_bad_prune_configs(fields, where):
    assert refused([prune(**fields)]).field == f"candidates[0].steps[0].{where}"


def test_iterative_schedule_round_trips():
    step = prune(method=common_pb2.PRUNE_METHOD_MAGNITUDE, sparsity=0.9, schedule=[0.5, 0.75, 0.9],
                 finetune=common_pb2.TrainingConfig(steps=50, learning_rate=1e-3))
    parsed = step_from_proto(step, "s")
    assert parsed.finetune.steps == 50 and "iterative 50%→75%→90%" in parsed.describe()
    assert step_from_proto(step_to_proto(parsed), "s") == parsed


def test_qat_grid_is_the_export_grid():
    pipeline = pipeline_from_protos([qat(quantization=INT4, training=common_pb2.TrainingConfig(steps=5))],
                                    IMAGE_CLASSIFICATION, "s")
    assert pipeline.quantize == pipeline.qat.quantization         # exported at the trained grid
    assert refused([qat(quantization=INT4), quantize(INT8)]).message.count("differs from the qat grid") == 1
    gguf = common_pb2.QuantizationConfig(method=common_pb2.QUANT_METHOD_RTN, gguf_type="q4_0")
    assert "generic RTN grid" in refused([qat(quantization=gguf)]).message
    assert refused([qat()]).field.endswith("qat.quantization")


def test_task_capabilities():
    assert refused([qat(quantization=INT4)], CAUSAL_LM).reason == "UNSUPPORTED_OP"
    heads = prune(method=common_pb2.PRUNE_METHOD_STRUCTURED, sparsity=0.25, unit=common_pb2.STRUCTURED_UNIT_HEADS)
    assert refused([heads], CAUSAL_LM).field.endswith("prune.unit")
    assert pipeline_from_protos([heads], TEXT_EMBEDDING, "s").transforms[0].unit == "heads"
    labelled = distill(alpha=0.5)
    assert refused([labelled], TEXT_EMBEDDING).field.endswith("distill.alpha")     # no labels
    assert isinstance(pipeline_from_protos([labelled], IMAGE_CLASSIFICATION, "s").transforms[0], DistillStep)


def test_training_bounds():
    assert refused([distill(training=common_pb2.TrainingConfig(learning_rate=2.0))]).field.endswith("learning_rate")
    assert refused([distill(temperature=-1)]).field.endswith("temperature")
    assert refused([common_pb2.CompressionStep()]).message.endswith("give one of prune, distill, qat, quantize")
    step = step_from_proto(qat(quantization=INT4, activations=True), "s")
    assert isinstance(step, QatStep) and step.training.steps == 200 and step.describe().startswith("qat int4")
