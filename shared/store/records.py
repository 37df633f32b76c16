"""Plain records of the artifact store (no protobuf here; services convert at their edge)."""
from __future__ import annotations

import dataclasses
import enum
from typing import Any


class ArtifactKind(enum.Enum):
    """Mirrors edgeforge.v1.ArtifactKind (value names without the prefix)."""
    SOURCE_MODEL = "SOURCE_MODEL"
    MODEL = "MODEL"
    DATASET = "DATASET"
    CALIBRATION_STATS = "CALIBRATION_STATS"
    COMPRESSED_MODEL = "COMPRESSED_MODEL"
    EXPORTED_MODEL = "EXPORTED_MODEL"
    REPORT = "REPORT"


@dataclasses.dataclass(frozen=True)
class Lineage:
    inputs: tuple[str, ...] = ()              # artifact names
    recipe: dict[str, Any] = dataclasses.field(default_factory=dict)
    tool_versions: dict[str, str] = dataclasses.field(default_factory=dict)
    producer: str = ""
    fidelity: dict[str, Any] = dataclasses.field(default_factory=dict)   # outputs vs the source, measured


@dataclasses.dataclass(frozen=True)
class ArtifactRecord:
    sha256: str
    kind: ArtifactKind
    size_bytes: int
    media_type: str = "application/octet-stream"
    display_name: str = ""
    create_time: float = 0.0                  # seconds since the epoch
    lineage: Lineage = Lineage()
    labels: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def name(self) -> str:
        return artifact_name(self.sha256)


@dataclasses.dataclass(frozen=True)
class UploadRecord:
    upload_id: str
    kind: ArtifactKind
    size_bytes: int
    sha256: str
    committed_bytes: int
    succeeded: bool
    media_type: str = ""
    display_name: str = ""
    labels: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"uploads/{self.upload_id}"


def artifact_name(sha256: str) -> str:
    return f"artifacts/{sha256}"


def parse_artifact_name(name: str, field: str = "name") -> str:
    """'artifacts/{sha256}' -> sha256, with a precise error otherwise."""
    from shared.errors import InvalidArgument
    from shared.store.blobs import check_sha256
    prefix = "artifacts/"
    if not name.startswith(prefix):
        raise InvalidArgument(f"{field} must look like 'artifacts/{{sha256}}', got {name[:100]!r}",
                              field=field)
    return check_sha256(name[len(prefix):], field)
