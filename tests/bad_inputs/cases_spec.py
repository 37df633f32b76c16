"""Bad build spec files (YAML) through the client's parser, clients/python/spec.py: each fails before
anything is uploaded, with a SpecError naming the field. The coordinator's own checks of the same
fields sent straight over gRPC are the build_* cases of cases_rpcs.py."""
from __future__ import annotations

import dataclasses

GOOD = """\
name: corpus
model: {path: model.gguf}
calibration: {text_file: calib.txt}
evaluation: {text_file: eval.txt}
targets: [{selector: {os: linux}}]
"""


@dataclasses.dataclass(frozen=True)
class SpecCase:
    name: str
    text: str           # the whole YAML file
    field: str          # SpecError.field, exactly
    message: str        # regex searched in the error


def _candidate(body: str) -> str:
    return GOOD + f"candidates:\n  - {body}\n"


DEEP = "a: " + "[" * 100_000 + "]" * 100_000 + "\n"
LAUGHS = "a: &a ['lol','lol','lol','lol','lol','lol','lol','lol','lol']\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{','.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8)) + GOOD

SPEC_CASES = [
    SpecCase("spec_not_yaml", "name: [unclosed\n", "spec", r"not valid YAML"),
    SpecCase("spec_not_a_mapping", "- just\n- a list\n", "spec", r"must be a mapping, got list"),
    SpecCase("spec_empty_file", "", "spec", r"must be a mapping, got NoneType"),
    SpecCase("spec_python_tag", "!!python/object/apply:os.system ['touch /tmp/edgeforge-pwned']\n", "spec",
             r"not valid YAML"),
    SpecCase("spec_nesting_100k_deep", DEEP, "spec", r"not valid YAML|too deeply nested"),
    SpecCase("spec_file_2_mib", GOOD + "#" * (2 << 20) + "\n", "spec", r"is \d+ bytes; a spec file is at most 1048576"),
    SpecCase("spec_not_utf8", GOOD.replace("corpus", "caf\udce9"), "spec", r"not UTF-8 text"),
    SpecCase("spec_billion_laughs", LAUGHS, "a", r"unknown key 'a'"),
    SpecCase("spec_unknown_key_suggests", GOOD + "quantisation: {}\n", "quantisation",
             r"unknown key 'quantisation' — did you mean"),
    SpecCase("spec_model_path_missing", GOOD.replace("model.gguf", "nowhere/model.gguf"), "model.path",
             r"does not exist"),
    SpecCase("spec_model_path_empty", GOOD.replace("{path: model.gguf}", "{}"), "model.path", r"is required"),
    SpecCase("spec_task_unknown", GOOD.replace("{path: model.gguf}", "{path: model.gguf, task: translation}"),
             "model.task", r"'translation' is not one of"),
    SpecCase("spec_no_targets", GOOD.replace("targets: [{selector: {os: linux}}]", "targets: []"), "targets",
             r"at least one target is required"),
    SpecCase("spec_target_selector_and_device",
             GOOD.replace("[{selector: {os: linux}}]", "[{selector: {os: linux}, device: devices/x}]"), "targets[0]",
             r"give exactly one of selector or device"),
    SpecCase("spec_samples_zero", GOOD.replace("{text_file: calib.txt}", "{text_file: calib.txt, samples: 0}"),
             "calibration.samples", r"must be in \(0, 4096\], got 0"),
    SpecCase("spec_sequence_length_huge",
             GOOD.replace("{text_file: calib.txt}", "{text_file: calib.txt, sequence_length: 99999999999999999999}"),
             "calibration.sequence_length", r"must be in \[8, 8192\]"),
    SpecCase("spec_samples_not_a_number",
             GOOD.replace("{text_file: calib.txt}", "{text_file: calib.txt, samples: lots}"), "calibration.samples",
             r"must be an integer, got str"),
    SpecCase("spec_samples_boolean", GOOD.replace("{text_file: calib.txt}", "{text_file: calib.txt, samples: true}"),
             "calibration.samples", r"must be an integer, got a boolean"),
    SpecCase("spec_priority_out_of_range", GOOD + "priority: 5000\n", "priority", r"must be in \[-1000, 1000\]"),
    SpecCase("spec_objective_unknown", GOOD + "objective: fastest\n", "objective", r"'fastest' is not one of"),
    SpecCase("spec_constraint_negative", GOOD + "constraints: {max_size_bytes: -1}\n", "constraints.max_size_bytes",
             r"must be positive, got -1"),
    SpecCase("spec_constraint_over_int64", GOOD + "constraints: {max_size_bytes: 200008888888888888888888888888}\n",
             "constraints.max_size_bytes", r"must fit in 64 bits"),          # found by tests/fuzz (fuzz_spec)
    SpecCase("spec_constraint_nan", GOOD + "constraints: {max_p90_latency_ms: .nan}\n",
             "constraints.max_p90_latency_ms", r"must be a finite number, got nan"),
    SpecCase("spec_constraint_infinite", GOOD + "constraints: {max_quality_loss_pct: .inf}\n",
             "constraints.max_quality_loss_pct", r"must be a finite number, got inf"),
    SpecCase("spec_format_unknown", _candidate("{format: tensorrt}"), "candidates[0].format",
             r"'tensorrt' is not one of"),
    SpecCase("spec_bits_0", _candidate("{format: onnx, quantization: {bits: 0, granularity: per_channel}}"),
             "candidates[0].quantization.bits", r"bits"),
    SpecCase("spec_bits_9", _candidate("{format: onnx, quantization: {bits: 9, granularity: per_channel}}"),
             "candidates[0].quantization.bits", r"9"),
    SpecCase("spec_group_size_negative",
             _candidate("{format: onnx, quantization: {bits: 4, granularity: per_group, group_size: -32}}"),
             "candidates[0].quantization.group_size", r"group_size"),
    SpecCase("spec_granularity_unknown", _candidate("{format: onnx, quantization: {bits: 4, granularity: per_row}}"),
             "candidates[0].quantization.granularity", r"'per_row' is not one of"),
    SpecCase("spec_gguf_type_unknown", _candidate("{format: gguf, quantization: {type: q9_9}}"),
             "candidates[0].quantization.type", r"q9_9"),
    SpecCase("spec_gguf_type_on_onnx", _candidate("{format: onnx, quantization: {type: q4_0}}"),
             "candidates[0].quantization.type", r"q4_0 is a GGUF block type"),
    SpecCase("spec_palette_bits_9", _candidate("{format: coreml, export: {coreml: {palette_bits: 9}}}"),
             "candidates[0].export.coreml.palette_bits", r"must be in \[0, 8\], got 9"),
    SpecCase("spec_prune_sparsity_1", _candidate("{format: onnx, steps: [{prune: {method: magnitude, sparsity: 1.0}}]}"),
             "candidates[0].steps[0].prune.sparsity", r"must be in \[0, 1\), got 1.0"),
    SpecCase("spec_step_two_kinds",
             _candidate("{format: onnx, steps: [{prune: {method: magnitude}, distill: {}}]}"), "candidates[0].steps[0]",
             r"give exactly one of prune, distill, qat, quantize"),
    SpecCase("spec_benchmark_threads_negative", GOOD + "benchmark: {threads: -4}\n", "benchmark.threads",
             r"must be in \(0, 1024\], got -4"),
    SpecCase("spec_name_not_a_string", GOOD.replace("name: corpus", "name: [1, 2]"), "name",
             r"must be a string, got list"),
]
