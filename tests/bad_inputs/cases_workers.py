"""Bad requests and bad datasets (.txt, .jsonl, token ids, .npz, .json) to the worker services:
Calibrator.Calibrate, Compressor.Compress/Transform, Exporter.Export/Evaluate."""
from __future__ import annotations

import json

import numpy as np
import specimens as s
from corpus import Case

from edgeforge.v1 import calibrator_pb2 as cal, common_pb2 as common, compressor_pb2 as comp, exporter_pb2 as exp

TEXT = b"The quick brown fox jumps over the lazy dog. " * 400
MISSING = f"artifacts/{'2' * 64}"


def lm(env) -> str:
    """The tiny llama with SmolLM2's real tokenizer, uploaded once."""
    return env.once("lm", lambda: env.put(s.lm_bundle(env.tokenizer_dir), display_name="tiny-lm.tar"))


def module(env) -> str:
    return env.once("module", lambda: env.put(s.module_bundle(s.module_dir(env.scratch / "valid-module")),
                                              display_name="small-cnn.tar"))


def text(env) -> str:
    return env.once("text", lambda: env.dataset(TEXT, "text.txt"))


def _data(data: bytes, display_name: str = "bad.txt"):
    return lambda env: env.dataset(data, display_name)


def calibrate(**fields):
    """request f(env, prepared): Calibrate of the tiny LM on `prepared` (a dataset) or on good text."""
    def request(env, prepared):
        values = {"model": lm(env), "dataset": prepared or text(env), "samples": 2, "sequence_length": 16, **fields}
        values = {k: v(env) if callable(v) else v for k, v in values.items()}
        return cal.CalibrateRequest(**values)
    return request


def compress(**quantization):
    def request(env, prepared):
        return comp.CompressRequest(model=lm(env), quantization=common.QuantizationConfig(**quantization))
    return request


RTN = common.QUANT_METHOD_RTN
PER_CHANNEL, PER_GROUP = common.GRANULARITY_PER_CHANNEL, common.GRANULARITY_PER_GROUP


def transform(*steps, task=common.MODEL_TASK_CAUSAL_LM, **fields):
    def request(env, prepared):
        values = {"evaluation_dataset": text(env), **fields}
        values = {k: v(env) if callable(v) else v for k, v in values.items()}
        return comp.TransformRequest(model=lm(env), task=task, steps=list(steps), **values)
    return request


MAGNITUDE = common.CompressionStep(prune=common.PruneConfig(method=common.PRUNE_METHOD_MAGNITUDE, sparsity=0.5))


def export(**fields):
    def request(env, prepared):
        values = {"model": lm(env), **fields}
        values = {k: v(env) if callable(v) else v for k, v in values.items()}
        return exp.ExportRequest(**values)
    return request


def evaluate(model=lm, **fields):
    def request(env, prepared):
        values = {"model": model(env), "format": common.EXPORT_FORMAT_REFERENCE,
                  "dataset": prepared or text(env), **fields}
        values = {k: v(env) if callable(v) else v for k, v in values.items()}
        return exp.EvaluateRequest(**values)
    return request


CASES = [
    # ---- Calibrator.Calibrate
    Case("calibrate_dataset_empty", "Calibrator.Calibrate", calibrate(), "INVALID_ARGUMENT",
         r"calibration.dataset .*(empty|no token)", prepare=_data(b"")),
    Case("calibrate_dataset_whitespace", "Calibrator.Calibrate", calibrate(), "INVALID_ARGUMENT",
         r"calibration.dataset", prepare=_data(b" \n\n\t \n")),
    Case("calibrate_dataset_too_short", "Calibrator.Calibrate", calibrate(samples=64, sequence_length=512),
         "INVALID_ARGUMENT", r"need \d+", prepare=_data(b"only a few words of text\n")),
    Case("calibrate_dataset_not_utf8", "Calibrator.Calibrate", calibrate(), "INVALID_ARGUMENT",
         r"calibration.dataset is not UTF-8 text", prepare=_data(b"caf\xe9 " * 100)),
    Case("calibrate_token_ids_outside_vocabulary", "Calibrator.Calibrate", calibrate(), "INVALID_ARGUMENT",
         r"token id 99999999 is outside the model's vocabulary",
         prepare=_data(b"#edgeforge-token-ids\n" + b"1 2 3 " * 50 + b"99999999\n")),
    Case("calibrate_token_ids_negative", "Calibrator.Calibrate", calibrate(), "INVALID_ARGUMENT",
         r"token id -5 is negative", prepare=_data(b"#edgeforge-token-ids\n" + b"1 2 3 " * 50 + b"-5\n")),
    Case("calibrate_jsonl_text_not_string", "Calibrator.Calibrate", calibrate(), "INVALID_ARGUMENT",
         r"line 2 has no string field \"text\"",
         prepare=_data(b'{"text": "fine"}\n{"text": 12}\n', "bad.jsonl")),
    Case("calibrate_samples_over_limit", "Calibrator.Calibrate", calibrate(samples=5000), "INVALID_ARGUMENT",
         r"calibration.samples must be in \[1, 4096\], got 5000"),
    Case("calibrate_sequence_length_4", "Calibrator.Calibrate", calibrate(sequence_length=4), "INVALID_ARGUMENT",
         r"calibration.sequence_length must be in \[8, 8192\], got 4"),
    Case("calibrate_model_is_a_dataset", "Calibrator.Calibrate", calibrate(model=text), "INVALID_ARGUMENT",
         r"model artifacts/\w+ is a DATASET, not a model"),
    Case("calibrate_dataset_is_a_model", "Calibrator.Calibrate", calibrate(dataset=lm), "INVALID_ARGUMENT",
         r"calibration.dataset artifacts/\w+ is a SOURCE_MODEL, not a dataset"),
    Case("calibrate_model_unknown", "Calibrator.Calibrate", calibrate(model=MISSING), "NOT_FOUND",
         rf"artifact {MISSING} does not exist"),
    # ---- Compressor.Compress
    Case("compress_bits_0", "Compressor.Compress", compress(method=RTN, bits=0, granularity=PER_CHANNEL),
         "INVALID_ARGUMENT", r"bits"),
    Case("compress_bits_9", "Compressor.Compress", compress(method=RTN, bits=9, granularity=PER_CHANNEL),
         "INVALID_ARGUMENT", r"quantization.bits .*9"),
    Case("compress_group_size_does_not_divide", "Compressor.Compress",
         compress(method=RTN, bits=4, granularity=PER_GROUP, group_size=24), "INVALID_ARGUMENT", r"group_size.*24"),
    Case("compress_group_size_negative", "Compressor.Compress",
         compress(method=RTN, bits=4, granularity=PER_GROUP, group_size=-32), "INVALID_ARGUMENT", r"group_size"),
    Case("compress_method_unknown_enum", "Compressor.Compress", compress(method=42, bits=4), "INVALID_ARGUMENT",
         r"quantization.method 42 is not one of"),
    Case("compress_granularity_unknown_enum", "Compressor.Compress", compress(method=RTN, bits=4, granularity=42),
         "INVALID_ARGUMENT", r"quantization.granularity 42 is unknown"),
    Case("compress_scale_unknown_enum", "Compressor.Compress",
         compress(method=RTN, bits=4, granularity=PER_CHANNEL, scale=42), "INVALID_ARGUMENT",
         r"quantization.scale 42 is unknown"),
    Case("compress_percentile_150", "Compressor.Compress",
         compress(method=RTN, bits=4, granularity=PER_CHANNEL, scale=common.SCALE_SEARCH_PERCENTILE, percentile=150),
         "INVALID_ARGUMENT", r"percentile"),
    Case("compress_gguf_type_unknown", "Compressor.Compress", compress(method=RTN, gguf_type="q9_9"),
         "INVALID_ARGUMENT", r"q9_9"),
    Case("compress_gptq_damp_negative", "Compressor.Compress",
         compress(method=common.QUANT_METHOD_GPTQ, gguf_type="q4_0", gptq=common.GptqOptions(damp_percent=-1)),
         "INVALID_ARGUMENT", r"damp_percent"),
    Case("compress_gptq_without_calibration_dataset", "Compressor.Compress",
         compress(method=common.QUANT_METHOD_GPTQ, gguf_type="q4_0"), "INVALID_ARGUMENT",
         r"calibration_dataset is required"),
    Case("compress_calibration_stats_not_stats", "Compressor.Compress",
         lambda env, _: comp.CompressRequest(model=lm(env), calibration_stats=text(env), quantization=common.
                                             QuantizationConfig(method=common.QUANT_METHOD_IMATRIX, gguf_type="q4_k")),
         "INVALID_ARGUMENT", r"calibration_stats"),
    Case("compress_model_is_a_dataset", "Compressor.Compress",
         lambda env, _: comp.CompressRequest(model=text(env), quantization=common.QuantizationConfig(
             method=RTN, gguf_type="q8_0")), "INVALID_ARGUMENT", r"model artifacts/\w+ is a DATASET, not a model"),
    Case("compress_model_corrupt_bundle", "Compressor.Compress",
         lambda env, bad: comp.CompressRequest(model=bad, quantization=common.QuantizationConfig(
             method=RTN, gguf_type="q8_0")), "INVALID_ARGUMENT", r"header",
         prepare=lambda env: env.put(s.decoder_bundle(b"\xff" * 64), common.ARTIFACT_KIND_MODEL, "corrupt.tar")),
    # ---- Compressor.Transform
    Case("transform_no_steps", "Compressor.Transform", transform(), "INVALID_ARGUMENT", r"steps"),
    Case("transform_without_evaluation_dataset", "Compressor.Transform", transform(MAGNITUDE, evaluation_dataset=""),
         "INVALID_ARGUMENT", r"evaluation_dataset is required"),
    Case("transform_sparsity_1_5", "Compressor.Transform",
         transform(common.CompressionStep(prune=common.PruneConfig(method=common.PRUNE_METHOD_MAGNITUDE, sparsity=1.5))),
         "INVALID_ARGUMENT", r"steps\[0\].prune.sparsity"),
    Case("transform_prune_method_unknown_enum", "Compressor.Transform",
         transform(common.CompressionStep(prune=common.PruneConfig(method=42, sparsity=0.5))),
         "INVALID_ARGUMENT", r"steps\[0\].prune.method"),
    Case("transform_n_m_group_zero", "Compressor.Transform",
         transform(common.CompressionStep(prune=common.PruneConfig(method=common.PRUNE_METHOD_MAGNITUDE, n=2, m=0))),
         "INVALID_ARGUMENT", r"steps\[0\].prune"),
    Case("transform_task_unknown_enum", "Compressor.Transform", transform(MAGNITUDE, task=42), "INVALID_ARGUMENT",
         r"task"),
    Case("transform_wanda_empty_calibration", "Compressor.Transform",
         transform(common.CompressionStep(prune=common.PruneConfig(method=common.PRUNE_METHOD_WANDA, sparsity=0.5)),
                   calibration_dataset=lambda env: env.dataset(b"", "empty.txt")),
         "INVALID_ARGUMENT", r"calibration_dataset artifacts/\w+ is empty"),
    # ---- Exporter.Export
    Case("export_format_unknown_enum", "Exporter.Export", export(format=42), "INVALID_ARGUMENT", r"format"),
    Case("export_format_reference", "Exporter.Export", export(format=common.EXPORT_FORMAT_REFERENCE),
         "INVALID_ARGUMENT", r"format reference cannot be exported"),
    Case("export_float_type_f8", "Exporter.Export",
         export(format=common.EXPORT_FORMAT_GGUF, options=common.ExportOptions(float_type="f8")), "INVALID_ARGUMENT",
         r"float_type"),
    Case("export_int8_activations_without_calibration", "Exporter.Export",
         export(format=common.EXPORT_FORMAT_ONNX, options=common.ExportOptions(int8_activations=True)),
         "FAILED_PRECONDITION", r"int8_activations needs calibration"),
    Case("export_lm_with_module_quantization", "Exporter.Export",
         export(format=common.EXPORT_FORMAT_ONNX, quantization=common.QuantizationConfig(method=RTN, bits=8)),
         "INVALID_ARGUMENT", r"quantization is the weight grid of image and encoder models"),
    Case("export_compressed_is_a_dataset", "Exporter.Export", export(format=common.EXPORT_FORMAT_GGUF, compressed=text),
         "INVALID_ARGUMENT", r"compressed artifacts/\w+ is a DATASET, not a compressed model"),
    Case("export_module_bits_9", "Exporter.Export",
         export(model=module, format=common.EXPORT_FORMAT_ONNX, quantization=common.QuantizationConfig(
             method=RTN, bits=9, granularity=PER_CHANNEL)), "INVALID_ARGUMENT", r"quantization.bits"),
    Case("export_module_per_group_on_conv", "Exporter.Export",
         export(model=module, format=common.EXPORT_FORMAT_ONNX, quantization=common.QuantizationConfig(
             method=RTN, bits=4, granularity=PER_GROUP, group_size=7)), "FAILED_PRECONDITION",
         r"cannot express a per-group grid on Conv weights"),
    # ---- Exporter.Evaluate (text for LMs; .npz images / .json sentences for module bundles)
    Case("evaluate_window_tokens_1", "Exporter.Evaluate", evaluate(window_tokens=1), "INVALID_ARGUMENT",
         r"window_tokens must be in \[2, 8192\], got 1"),
    Case("evaluate_max_tokens_negative", "Exporter.Evaluate", evaluate(max_tokens=-1), "INVALID_ARGUMENT",
         r"max_tokens must be positive, got -1"),
    Case("evaluate_dataset_empty", "Exporter.Evaluate", evaluate(), "INVALID_ARGUMENT", r"evaluation.dataset is empty",
         prepare=_data(b"")),
    Case("evaluate_gguf_without_tokenizer_model", "Exporter.Evaluate",
         evaluate(model=text, format=common.EXPORT_FORMAT_GGUF), "INVALID_ARGUMENT", r"tokenizer_model is required"),
    Case("evaluate_module_images_float", "Exporter.Evaluate", evaluate(model=module), "INVALID_ARGUMENT",
         r"`images` are float32; expected uint8 pixels",
         prepare=_data(s.images_npz(np.zeros((4, 28, 28), np.float32)), "images.npz")),
    Case("evaluate_module_images_pickled_objects", "Exporter.Evaluate", evaluate(model=module), "INVALID_ARGUMENT",
         r"dataset", prepare=_data(s.images_npz(np.array([object()] * 3, dtype=object)), "pickled.npz")),
    Case("evaluate_module_no_images_array", "Exporter.Evaluate", evaluate(model=module), "INVALID_ARGUMENT",
         r"dataset has arrays \['pixels'\]", prepare=_data(s.images_npz(pixels=np.zeros((2, 28, 28), np.uint8)), "x.npz")),
    Case("evaluate_module_zero_images", "Exporter.Evaluate", evaluate(model=module), "INVALID_ARGUMENT",
         r"dataset", prepare=_data(s.images_npz(np.zeros((0, 28, 28), np.uint8)), "none.npz")),
    Case("evaluate_module_labels_mismatch", "Exporter.Evaluate", evaluate(model=module), "INVALID_ARGUMENT",
         r"labels", prepare=_data(s.images_npz(np.zeros((4, 28, 28), np.uint8), labels=np.zeros(3, np.int64)),
                                  "labels.npz")),
    Case("evaluate_module_npz_truncated", "Exporter.Evaluate", evaluate(model=module), "INVALID_ARGUMENT",
         r"dataset", prepare=_data(s.images_npz(np.zeros((4, 28, 28), np.uint8))[:-60], "cut.npz")),
    Case("evaluate_module_sentences_for_images", "Exporter.Evaluate", evaluate(model=module), "INVALID_ARGUMENT",
         r"dataset is not an .npz archive of images", prepare=_data(json.dumps(["a sentence", "another"]).encode(), "s.json")),
    Case("evaluate_module_max_samples_negative", "Exporter.Evaluate", evaluate(model=module, max_samples=-1),
         "INVALID_ARGUMENT", r"max_samples must be ≥ 0, got -1"),
]
