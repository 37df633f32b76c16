"""The bad-input corpus (issue 7): every case's RPC fails with the exact status and a message naming the
problem, the server answers afterwards, and nothing partial became visible in the store.

Cases live in the cases_*.py tables (corpus.Case); this module runs them all against one real
coordinator with embedded workers (conftest.py).
"""
from __future__ import annotations

import re

import cases_models
import cases_rpcs
import cases_spec
import cases_store
import cases_workers
import grpc
import pytest
from corpus import ADMIN, Case, request_of

CASES = [*cases_store.CASES, *cases_rpcs.CASES, *cases_models.CASES, *cases_workers.CASES]
STREAMING_RESPONSES = {"ArtifactStore.ReadArtifact", "AgentGateway.FetchArtifact"}


def test_case_names_are_unique():
    names = [case.name for case in [*CASES, *cases_spec.SPEC_CASES]]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)


def _param(case: Case):
    marks = [pytest.mark.xfail(strict=True, reason=f"FINDING: {case.finding}")] if case.finding else []
    if case.hazard:              # it would take the shared server down with it: listed, not run
        marks = [pytest.mark.skip(reason=f"FINDING (not run, it would hang the shared server): {case.hazard}")]
    return pytest.param(case, id=case.name, marks=marks)


def invoke(env, case: Case, request):
    service, method = case.rpc.split(".")
    if case.metadata == ADMIN:
        stub, metadata = env.stub(service), None
    else:
        stub, metadata = env.stub(service, bare=True), case.metadata(env)
    call = getattr(stub, method)
    response = call(iter(request) if isinstance(request, list) else request, timeout=120, metadata=metadata)
    return list(response) if case.rpc in STREAMING_RESPONSES else response


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_bad_input(env, case: Case):
    prepared = case.prepare(env) if case.prepare else None
    request = request_of(case, env, prepared)          # may upload the valid inputs it starts from
    before = env.snapshot()
    with pytest.raises(grpc.RpcError) as caught:
        invoke(env, case, request)
    error = caught.value
    got = f"{error.code().name}: {error.details()}"
    assert error.code().name == case.code, f"{case.rpc}: expected {case.code}, got {got}"
    assert re.search(case.message, error.details() or ""), f"{case.rpc}: message {error.details()!r} lacks " \
                                                           f"/{case.message}/"
    env.assert_alive()
    assert env.snapshot() == before, "a failed call left something in the store"
    if case.check:
        case.check(env, prepared)


@pytest.fixture(scope="module")
def spec_dir(tmp_path_factory):
    """What the spec files name: a model file and two text files beside them."""
    directory = tmp_path_factory.mktemp("spec")
    (directory / "model.gguf").write_bytes(b"GGUF" + bytes(60))
    (directory / "calib.txt").write_text("calibration text\n")
    (directory / "eval.txt").write_text("evaluation text\n")
    return directory


def test_good_spec_parses(spec_dir):
    from clients.python.spec import load
    (spec_dir / "good.yaml").write_text(cases_spec.GOOD)
    assert load(spec_dir / "good.yaml").spec.targets[0].selector["os"] == "linux"


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name) for c in cases_spec.SPEC_CASES])
def test_bad_spec_file(spec_dir, case):
    from clients.python.spec import SpecError, load
    path = spec_dir / f"{case.name}.yaml"
    path.write_bytes(case.text.encode("utf-8", "surrogateescape"))   # lone surrogates: raw non-UTF-8 bytes
    with pytest.raises(SpecError) as caught:
        load(path)
    assert caught.value.field == case.field, str(caught.value)
    assert re.search(case.message, str(caught.value)), str(caught.value)
