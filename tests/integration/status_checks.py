"""Reading a failed call's canonical code and ErrorInfo reason in assertions."""
from __future__ import annotations


def rpc_code(error) -> str:
    return error.value.code().name


def reason(error) -> str:
    from shared.grpc_status import error_details
    return error_details(error.value)[0]
