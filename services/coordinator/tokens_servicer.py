"""Tokens servicer: token administration over RPC (admin only) and WhoAmI (any live token).

The AuthInterceptor has already verified the caller (admin for every method but WhoAmI); WhoAmI
returns that verified token, which is how a standalone worker service checks its callers.
"""
from __future__ import annotations

from edgeforge.v1 import tokens_pb2, tokens_pb2_grpc
from shared.auth import ROLE_TO_PROTO, TokenStore, caller, require_admin, token_to_proto
from shared.errors import InvalidArgument, Unauthenticated
from shared.grpc_status import rpc

SERVICE_NAME = "edgeforge.v1.Tokens"
_ROLES = {value: role for role, value in ROLE_TO_PROTO.items()}


class TokensServicer(tokens_pb2_grpc.TokensServicer):
    def __init__(self, tokens: TokenStore):
        self.tokens = tokens

    @rpc
    def CreateToken(self, request, context):
        require_admin("CreateToken")
        if request.role not in _ROLES:
            raise InvalidArgument(f"role must be TOKEN_ROLE_ADMIN, _BUILDER or _AGENT, got {request.role}",
                                  field="role")
        token, secret = self.tokens.create(_ROLES[request.role], request.display_name)
        return tokens_pb2.CreateTokenResponse(token=token_to_proto(token), secret=secret)

    @rpc
    def ListTokens(self, request, context):
        require_admin("ListTokens")
        return tokens_pb2.ListTokensResponse(tokens=[token_to_proto(t) for t in self.tokens.list()])

    @rpc
    def RevokeToken(self, request, context):
        require_admin("RevokeToken")
        token_id = request.name.removeprefix("tokens/")
        if not token_id or len(token_id) > 64:
            raise InvalidArgument(f"name must look like 'tokens/{{id}}', got {request.name[:100]!r}", field="name")
        return token_to_proto(self.tokens.revoke(token_id))

    @rpc
    def WhoAmI(self, request, context):
        token = caller()
        if token is None:
            raise Unauthenticated("this server runs without authentication; there is no token to describe")
        return token_to_proto(token)


def registration(tokens: TokenStore):
    return (tokens_pb2_grpc.add_TokensServicer_to_server, TokensServicer(tokens), SERVICE_NAME)
