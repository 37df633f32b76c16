"""ONNX export of a llama causal LM (graph in onnx_graph.py): float32, or weight-only quantized
through DequantizeLinear over the compressor's own codes."""
from __future__ import annotations

from pathlib import Path

from services.exporter.base import ExportedFile, Exporter, ExportFormat, ExportInput
from shared.errors import FailedPrecondition

MEDIA_TYPE = "application/onnx"
PROTOBUF_LIMIT_BYTES = 2 << 30


class OnnxExporter(Exporter):
    format = ExportFormat.ONNX
    suffix = ".onnx"

    def export(self, source: ExportInput, out_path: Path) -> ExportedFile:
        import onnx
        from services.exporter.formats.onnx_graph import OPSET, build_llama
        if source.float_type != "f32":
            raise FailedPrecondition("ONNX export writes float tensors as float32 at this version; "
                                     "float16 arrives with the exporter issue", field="float_type")
        model = build_llama(source.model.config, source.tensor)
        size = model.ByteSize()
        if size >= PROTOBUF_LIMIT_BYTES:
            raise FailedPrecondition(f"the ONNX graph is {size} bytes, over protobuf's 2 GiB limit; external "
                                     "data is not implemented yet", field="model")
        onnx.save_model(model, str(out_path))
        return ExportedFile(out_path, MEDIA_TYPE, {"format": "onnx", "opset": str(OPSET)})
