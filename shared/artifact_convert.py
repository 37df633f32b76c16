"""Artifact records <-> edgeforge.v1 protos (the only place the two meet)."""
from __future__ import annotations

from google.protobuf import json_format, struct_pb2, timestamp_pb2

from edgeforge.v1 import common_pb2
from shared.store.records import ArtifactKind, ArtifactRecord, Lineage


def kind_to_proto(kind: ArtifactKind) -> int:
    return common_pb2.ArtifactKind.Value(f"ARTIFACT_KIND_{kind.value}")


def kind_from_proto(value: int, field: str = "kind") -> ArtifactKind:
    from shared.errors import InvalidArgument
    try:
        name = common_pb2.ArtifactKind.Name(value)
    except ValueError:
        raise InvalidArgument(f"{field} {value} is not a known ArtifactKind", field=field)
    if name == "ARTIFACT_KIND_UNSPECIFIED":
        raise InvalidArgument(f"{field} must be set", field=field)
    return ArtifactKind(name.removeprefix("ARTIFACT_KIND_"))


def struct(value: dict) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(value)
    return out


def lineage_to_proto(lineage: Lineage) -> common_pb2.Lineage:
    return common_pb2.Lineage(inputs=list(lineage.inputs), recipe=struct(lineage.recipe),
                              tool_versions=lineage.tool_versions, producer=lineage.producer,
                              fidelity=struct(lineage.fidelity))


def lineage_from_proto(proto: common_pb2.Lineage) -> Lineage:
    return Lineage(tuple(proto.inputs), json_format.MessageToDict(proto.recipe), dict(proto.tool_versions),
                   proto.producer, json_format.MessageToDict(proto.fidelity))


def artifact_to_proto(record: ArtifactRecord) -> common_pb2.Artifact:
    created = timestamp_pb2.Timestamp()
    created.FromNanoseconds(int(record.create_time * 1e9))
    return common_pb2.Artifact(
        name=record.name, kind=kind_to_proto(record.kind), sha256=record.sha256, size_bytes=record.size_bytes,
        media_type=record.media_type, display_name=record.display_name, create_time=created,
        lineage=lineage_to_proto(record.lineage), labels=record.labels)


def artifact_from_proto(proto: common_pb2.Artifact) -> ArtifactRecord:
    return ArtifactRecord(proto.sha256, kind_from_proto(proto.kind), proto.size_bytes, proto.media_type,
                          proto.display_name, proto.create_time.ToNanoseconds() / 1e9,
                          lineage_from_proto(proto.lineage), dict(proto.labels))
