"""Bad input to the coordinator's control RPCs: Coordinator, Operations, DeviceRegistry, AgentGateway, Tokens, and
calls without a valid token."""
from __future__ import annotations

from corpus import Case
from google.longrunning import operations_proto_pb2 as ops
from google.protobuf import duration_pb2

from edgeforge.v1 import agent_pb2 as agent, common_pb2, compressor_pb2 as compressor, coordinator_pb2 as pb
from edgeforge.v1 import tokens_pb2 as tokens

UNKNOWN_BUILD = "b-000000000000"


def _session(env) -> dict:
    """A valid spec's inputs, uploaded once: a model bundle that imports and two held-out datasets."""
    import specimens

    def make():
        return {"model": env.put(specimens.decoder_bundle(), display_name="tiny.tar"),
                "calibration": env.dataset(b"calibration text for the corpus\n" * 50, "calib.txt"),
                "evaluation": env.dataset(b"held-out evaluation text\n" * 50, "eval.txt")}
    return env.once("spec-inputs", make)


def build(edit=None, request_id: str = ""):
    """request f(env, _): CreateBuild of a valid spec after `edit(spec, inputs)` made it bad."""
    def request(env, prepared):
        inputs = _session(env)
        spec = pb.BuildSpec(display_name="bad-inputs")
        spec.model.artifact = inputs["model"]
        spec.calibration.dataset = inputs["calibration"]
        spec.evaluation.dataset = inputs["evaluation"]
        spec.targets.add(selector={"os": "linux"}, name="laptop")
        if edit is not None:
            edit(spec, {**inputs, "prepared": prepared})
        return pb.CreateBuildRequest(spec=spec, request_id=request_id)
    return request


def _candidate(**quantization):
    def edit(spec, inputs):
        spec.candidates.add(format=common_pb2.EXPORT_FORMAT_GGUF if "gguf_type" in quantization
                            else common_pb2.EXPORT_FORMAT_ONNX, quantization=common_pb2.QuantizationConfig(**quantization))
    return edit


def _first_build(env):
    """prepare: a build under request_id "bad-inputs-build" (its model fails to import at once), run to its end."""
    request = build(lambda spec, inputs: setattr(spec.model, "artifact",
                                                 env.put(b"GGUF" + b"\xff" * 60, display_name="broken.gguf")),
                    request_id="bad-inputs-build")(env, None)
    operation = env.stub("Coordinator").CreateBuild(request, timeout=60)
    timeout = duration_pb2.Duration(seconds=60)
    done = env.stub("Operations").WaitOperation(ops.WaitOperationRequest(name=operation.name, timeout=timeout),
                                                timeout=90)
    assert done.done


def _agent_metadata(role: str):
    return lambda env: (("authorization", f"Bearer {env.tokens[role]}"),)


REGISTER = agent.RegisterAgentRequest(device_id="bad-inputs-device", attributes={"os": "linux"})
NO_TOKEN = lambda env: ()                                                           # noqa: E731
BASIC = lambda env: (("authorization", "Basic YWRtaW46YWRtaW4="),)                   # noqa: E731
UNKNOWN = lambda env: (("authorization", "Bearer ef_" + "A" * 43),)                  # noqa: E731

CASES = [
    # ---- Coordinator.CreateBuild: the coordinator's own spec validation (the client's is cases_spec.py)
    Case("build_no_targets", "Coordinator.CreateBuild", build(lambda spec, _: spec.ClearField("targets")),
         "INVALID_ARGUMENT", r"at least one target is required"),
    Case("build_model_missing", "Coordinator.CreateBuild",
         build(lambda spec, _: setattr(spec.model, "artifact", f"artifacts/{'1' * 64}")), "INVALID_ARGUMENT",
         r"model.artifact artifacts/1{64} does not exist"),
    Case("build_model_name_traversal", "Coordinator.CreateBuild",
         build(lambda spec, _: setattr(spec.model, "artifact", "artifacts/../../../etc/passwd")), "INVALID_ARGUMENT",
         r"model.artifact must be 64 lowercase hex"),
    Case("build_model_is_a_dataset", "Coordinator.CreateBuild",
         build(lambda spec, inputs: setattr(spec.model, "artifact", inputs["calibration"])), "INVALID_ARGUMENT",
         r"model.artifact artifacts/\w+ is a DATASET, expected SOURCE_MODEL/MODEL"),
    Case("build_model_wrong_magic", "Coordinator.CreateBuild",
         build(lambda spec, inputs: setattr(spec.model, "artifact", inputs["prepared"])), "INVALID_ARGUMENT",
         r"neither a GGUF file \(magic b'GGUF', got b'GGUX'\)",
         prepare=lambda env: env.put(b"GGUX" + b"\0" * 60, display_name="wrong-magic.gguf")),
    Case("build_calibration_is_evaluation", "Coordinator.CreateBuild",
         build(lambda spec, inputs: setattr(spec.evaluation, "dataset", inputs["calibration"])), "INVALID_ARGUMENT",
         r"calibration and evaluation data are the same artifact"),
    Case("build_objective_unknown_enum", "Coordinator.CreateBuild", build(lambda spec, _: setattr(spec, "objective", 99)),
         "INVALID_ARGUMENT", r"objective 99 is unknown"),
    Case("build_task_unknown_enum", "Coordinator.CreateBuild",
         build(lambda spec, _: setattr(spec.model, "task", 42)), "INVALID_ARGUMENT", r"task"),
    Case("build_format_unknown_enum", "Coordinator.CreateBuild",
         build(lambda spec, _: spec.candidates.add(format=42)), "INVALID_ARGUMENT", r"candidates\[0\].format"),
    Case("build_bits_9", "Coordinator.CreateBuild",
         build(_candidate(method=common_pb2.QUANT_METHOD_RTN, bits=9, granularity=common_pb2.GRANULARITY_PER_CHANNEL)),
         "INVALID_ARGUMENT", r"candidates\[0\].quantization.bits"),
    Case("build_gguf_type_unknown", "Coordinator.CreateBuild",
         build(_candidate(method=common_pb2.QUANT_METHOD_RTN, gguf_type="q9_9")), "INVALID_ARGUMENT", r"q9_9"),
    Case("build_priority_out_of_range", "Coordinator.CreateBuild", build(lambda spec, _: setattr(spec, "priority", 5000)),
         "INVALID_ARGUMENT", r"priority must be in \[-1000, 1000\], got 5000"),
    Case("build_constraint_negative", "Coordinator.CreateBuild",
         build(lambda spec, _: setattr(spec.constraints, "max_size_bytes", -1)), "INVALID_ARGUMENT",
         r"constraints.max_size_bytes must not be negative"),
    Case("build_constraint_nan", "Coordinator.CreateBuild",
         build(lambda spec, _: setattr(spec.constraints, "max_p90_latency_ms", float("nan"))), "INVALID_ARGUMENT",
         r"constraints.max_p90_latency_ms must not be negative, got nan"),
    Case("build_calibration_samples_huge", "Coordinator.CreateBuild",
         build(lambda spec, _: setattr(spec.calibration, "samples", 2 ** 31 - 1)), "INVALID_ARGUMENT",
         r"calibration.samples must be in \[1, 4096\]"),
    Case("build_target_selector_bad_range", "Coordinator.CreateBuild",
         build(lambda spec, _: spec.targets[0].selector.update({"os_version": "[15,13)"})), "INVALID_ARGUMENT",
         r"targets\[0\].selector.os_version '\[15,13\)' is empty"),
    Case("build_target_name_oversized", "Coordinator.CreateBuild",
         build(lambda spec, _: setattr(spec.targets[0], "name", "x" * 100_000)), "INVALID_ARGUMENT",
         r"target name must be 1-63 lowercase"),
    Case("build_request_id_oversized", "Coordinator.CreateBuild", build(request_id="r" * 129), "INVALID_ARGUMENT",
         r"request_id is longer than 128 characters"),
    Case("build_request_id_reused_other_spec", "Coordinator.CreateBuild", build(request_id="bad-inputs-build"),
         "ALREADY_EXISTS", r"request_id 'bad-inputs-build' was already used for a different build spec",
         prepare=_first_build),
    # ---- Coordinator.GetBuild / ListBuilds, Operations
    Case("get_build_traversal", "Coordinator.GetBuild", pb.GetBuildRequest(name="builds/../b-1"), "INVALID_ARGUMENT",
         r"name must look like 'builds/\{id\}'"),
    Case("get_build_unknown", "Coordinator.GetBuild", pb.GetBuildRequest(name=f"builds/{UNKNOWN_BUILD}"), "NOT_FOUND",
         rf"build builds/{UNKNOWN_BUILD} does not exist"),
    Case("list_builds_page_size_over_cap", "Coordinator.ListBuilds", pb.ListBuildsRequest(page_size=1_000_000),
         "INVALID_ARGUMENT", r"page_size must be in \[1, 1000\], got 1000000"),
    Case("list_builds_page_token_forged", "Coordinator.ListBuilds", pb.ListBuildsRequest(page_token="abc"),
         "INVALID_ARGUMENT", r"page_token 'abc' is not one this server issued"),
    Case("get_operation_empty_id", "Operations.GetOperation", ops.GetOperationRequest(name="operations/"),
         "INVALID_ARGUMENT", r"name must look like 'operations/\{id\}'"),
    Case("wait_operation_unknown", "Operations.WaitOperation", ops.WaitOperationRequest(name=f"operations/{UNKNOWN_BUILD}"),
         "NOT_FOUND", rf"build builds/{UNKNOWN_BUILD} does not exist"),
    Case("cancel_operation_unknown", "Operations.CancelOperation",
         ops.CancelOperationRequest(name=f"operations/{UNKNOWN_BUILD}"), "NOT_FOUND", r"does not exist"),
    Case("delete_operation_bad_name", "Operations.DeleteOperation", ops.DeleteOperationRequest(name="builds/b-1"),
         "INVALID_ARGUMENT", r"name must look like 'operations/\{id\}'"),
    Case("list_operations_page_size_negative", "Operations.ListOperations", ops.ListOperationsRequest(page_size=-1),
         "INVALID_ARGUMENT", r"page_size must be in \[1, 1000\]"),
    # ---- DeviceRegistry
    Case("get_device_bad_name", "DeviceRegistry.GetDevice", pb.GetDeviceRequest(name="devices/UPPER/../x"),
         "INVALID_ARGUMENT", r"name must look like 'devices/\{id\}'"),
    Case("get_device_unknown", "DeviceRegistry.GetDevice", pb.GetDeviceRequest(name="devices/nobody"), "NOT_FOUND",
         r"devices/nobody"),
    Case("list_devices_selector_bad_range", "DeviceRegistry.ListDevices",
         pb.ListDevicesRequest(selector={"os_version": "[15,13)"}), "INVALID_ARGUMENT",
         r"selector.os_version '\[15,13\)' is empty"),
    # ---- AgentGateway
    Case("register_device_id_traversal", "AgentGateway.RegisterAgent", agent.RegisterAgentRequest(device_id="../etc"),
         "INVALID_ARGUMENT", r"device_id must be 1-63 lowercase letters"),
    Case("register_device_id_oversized", "AgentGateway.RegisterAgent", agent.RegisterAgentRequest(device_id="a" * 64),
         "INVALID_ARGUMENT", r"device_id must be 1-63"),
    Case("register_slots_negative", "AgentGateway.RegisterAgent",
         agent.RegisterAgentRequest(device_id="bad-inputs-device", slots=-1), "INVALID_ARGUMENT",
         r"slots must be in \[0, 64\], got -1"),
    Case("register_attributes_too_many", "AgentGateway.RegisterAgent",
         agent.RegisterAgentRequest(device_id="bad-inputs-device", attributes={f"k{i}": "v" for i in range(300)}),
         "INVALID_ARGUMENT", r"attributes has 300 entries; at most 256"),
    Case("register_attribute_value_oversized", "AgentGateway.RegisterAgent",
         agent.RegisterAgentRequest(device_id="bad-inputs-device", attributes={"os": "x" * 5000}),
         "INVALID_ARGUMENT", r"attributes entry 'os'"),
    Case("heartbeat_bad_device_name", "AgentGateway.Heartbeat", agent.HeartbeatRequest(device="bad-inputs-device"),
         "INVALID_ARGUMENT", r"device must look like 'devices/\{id\}'"),
    Case("heartbeat_unregistered_device", "AgentGateway.Heartbeat", agent.HeartbeatRequest(device="devices/ghost"),
         "NOT_FOUND", r"devices/ghost"),
    Case("lease_wait_ms_over_limit", "AgentGateway.LeaseJob", agent.LeaseJobRequest(device="devices/x", wait_ms=60_000),
         "INVALID_ARGUMENT", r"wait_ms must be in \[0, 30000\], got 60000"),
    Case("lease_wait_ms_negative", "AgentGateway.LeaseJob", agent.LeaseJobRequest(device="devices/x", wait_ms=-1),
         "INVALID_ARGUMENT", r"wait_ms must be in \[0, 30000\], got -1"),
    Case("report_lease_bad_name", "AgentGateway.ReportResult",
         agent.ReportResultRequest(lease="jobs/1"), "INVALID_ARGUMENT",
         r"lease must look like 'leases/\{id\}'"),
    Case("report_no_outcome", "AgentGateway.ReportResult", agent.ReportResultRequest(lease="leases/x"),
         "INVALID_ARGUMENT", r"give a measurement or an error"),
    Case("report_measurement_without_samples", "AgentGateway.ReportResult",
         agent.ReportResultRequest(lease="leases/x", measurement=common_pb2.Measurement(load_ms=1.0)),
         "INVALID_ARGUMENT", r"measurement has no latency samples"),
    Case("report_unknown_lease", "AgentGateway.ReportResult",
         agent.ReportResultRequest(lease="leases/nope", measurement=common_pb2.Measurement(
             latency=common_pb2.LatencyStats(samples_ms=[1.0]))), "NOT_FOUND", r"lease leases/nope does not exist"),
    Case("fetch_unknown_lease", "AgentGateway.FetchArtifact", agent.FetchArtifactRequest(lease="leases/nope"),
         "NOT_FOUND", r"lease leases/nope does not exist"),
    # ---- authentication and roles (the AgentGateway is guarded today; every service once auth lands)
    Case("agent_no_token", "AgentGateway.RegisterAgent", REGISTER, "UNAUTHENTICATED",
         r"needs the metadata 'authorization: Bearer <token>'", metadata=NO_TOKEN),
    Case("agent_basic_auth_header", "AgentGateway.RegisterAgent", REGISTER, "UNAUTHENTICATED",
         r"must be 'Bearer <token>'", metadata=BASIC),
    Case("agent_unknown_token", "AgentGateway.RegisterAgent", REGISTER, "UNAUTHENTICATED", r"unknown bearer token",
         metadata=UNKNOWN),
    Case("agent_gateway_builder_role", "AgentGateway.RegisterAgent", REGISTER, "PERMISSION_DENIED",
         r"a builder token may not call edgeforge.v1.AgentGateway", metadata=_agent_metadata("builder")),
    Case("store_no_token", "ArtifactStore.ListArtifacts", pb.ListArtifactsRequest(), "UNAUTHENTICATED",
         r"authorization", metadata=NO_TOKEN),
    Case("coordinator_unknown_token", "Coordinator.ListBuilds", pb.ListBuildsRequest(), "UNAUTHENTICATED",
         r"unknown bearer token", metadata=UNKNOWN),
    Case("compressor_builder_role", "Compressor.ImportModel", compressor.ImportModelRequest(source=f"artifacts/{'1' * 64}"),
         "PERMISSION_DENIED", r"builder", metadata=_agent_metadata("builder")),
    Case("coordinator_agent_role", "Coordinator.ListBuilds", pb.ListBuildsRequest(), "PERMISSION_DENIED", r"agent",
         metadata=_agent_metadata("agent")),
    # ---- Tokens
    Case("tokens_create_role_unspecified", "Tokens.CreateToken", tokens.CreateTokenRequest(display_name="ci"),
         "INVALID_ARGUMENT", r"role must be TOKEN_ROLE_ADMIN, _BUILDER or _AGENT, got 0"),
    Case("tokens_create_role_unknown_enum", "Tokens.CreateToken", tokens.CreateTokenRequest(role=9, display_name="ci"),
         "INVALID_ARGUMENT", r"role must be .*, got 9"),
    Case("tokens_create_name_empty", "Tokens.CreateToken", tokens.CreateTokenRequest(role=2),
         "INVALID_ARGUMENT", r"a token needs a name of 1-128 characters"),
    Case("tokens_create_name_too_long", "Tokens.CreateToken", tokens.CreateTokenRequest(role=2, display_name="x" * 129),
         "INVALID_ARGUMENT", r"a token needs a name of 1-128 characters"),
    Case("tokens_create_by_builder", "Tokens.CreateToken", tokens.CreateTokenRequest(role=1, display_name="escalate"),
         "PERMISSION_DENIED", r"a builder token may not call edgeforge.v1.Tokens", metadata=_agent_metadata("builder")),
    Case("tokens_revoke_unknown_id", "Tokens.RevokeToken", tokens.RevokeTokenRequest(name="tokens/nope1234"),
         "NOT_FOUND", r"no token has id 'nope1234'"),
    Case("tokens_revoke_empty_name", "Tokens.RevokeToken", tokens.RevokeTokenRequest(name="tokens/"),
         "INVALID_ARGUMENT", r"name must look like 'tokens/\{id\}'"),
    Case("tokens_whoami_no_token", "Tokens.WhoAmI", tokens.WhoAmIRequest(), "UNAUTHENTICATED",
         r"no token was sent", metadata=NO_TOKEN),
]
