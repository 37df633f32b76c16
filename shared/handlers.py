"""Rebuilding a gRPC method handler around new behaviour, whatever its kind.

Server interceptors that act around the call (auth sets the caller, metrics time it) wrap the handler's
behaviour function: `unary` wraps the kinds that return one response (unary-unary, stream-unary),
`streaming` the kinds that yield responses (unary-stream, stream-stream), and the (de)serializers stay.
"""
from __future__ import annotations

from typing import Callable

import grpc

Behaviour = Callable


def rewrap(handler: grpc.RpcMethodHandler, unary: Callable[[Behaviour], Behaviour],
           streaming: Callable[[Behaviour], Behaviour]) -> grpc.RpcMethodHandler:
    """`handler` with its behaviour wrapped by `unary` or `streaming`, according to its kind."""
    serializers = (handler.request_deserializer, handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary(handler.unary_unary), *serializers)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary(handler.stream_unary), *serializers)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(streaming(handler.unary_stream), *serializers)
    return grpc.stream_stream_rpc_method_handler(streaming(handler.stream_stream), *serializers)
