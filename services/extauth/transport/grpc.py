"""gRPC transport: ``envoy.service.auth.v3.Authorization/Check`` ↔ core types. Nothing else."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2
from google.rpc import code_pb2, status_pb2

from ..core import CheckRequest, Decision

SERVICE_NAME = "envoy.service.auth.v3.Authorization"

OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
APPEND = base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD

#: the per-route context extension that says Envoy wrote the client address in the header
CLIENT_ADDRESS_EXTENSION = "client_address"
CLIENT_ADDRESS_HEADER = "x-outrider-client-address"

Decide = Callable[[CheckRequest, str], Awaitable[Decision]]


def request_from_proto(request: external_auth_pb2.CheckRequest) -> CheckRequest:
    attrs = request.attributes
    http = attrs.request.http
    # Envoy's header names are already lower-case. The proto map itself, not a copy: it
    # is a read-only Mapping for the check (lookups are C calls; a dict() copy costs
    # more than the lookups a check makes). Each field is read once: every read of a
    # sub-message builds a new wrapper object.
    headers: Mapping[str, str] = http.headers
    if not headers:
        # encode_raw_headers: values arrive in raw_value; repeated names are joined like
        # Envoy joins them in the ``headers`` map.
        joined: dict[str, str] = {}
        for h in http.header_map.headers:
            name = h.key.lower()
            value = h.raw_value.decode("utf-8", "replace") if h.raw_value else h.value
            joined[name] = f"{joined[name]},{value}" if name in joined else value
        headers = joined
    extensions = attrs.context_extensions  # read-only too
    source = attrs.source.address.socket_address.address
    if extensions.get(CLIENT_ADDRESS_EXTENSION) == "header":
        # Envoy's own client address (after X-Forwarded-For / custom-header detection, which
        # attributes.source, the TCP peer, ignores), in a header the translator's Envoy
        # config overwrites before ext_authz; only trusted when the route says so.
        source = headers.get(CLIENT_ADDRESS_HEADER, source)
    return CheckRequest(
        http.method or headers.get(":method", ""),
        http.path or headers.get(":path", ""),
        http.host or headers.get(":authority", ""),
        http.scheme or headers.get(":scheme", ""),
        headers,
        source,
        extensions,
        request_id=http.id,
    )


def _header(name: str, value: str, action: int) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=name, value=value), append_action=action
    )


def _repeatable(name: str) -> int:
    return APPEND if name.lower() == "set-cookie" else OVERWRITE


def _set_value(target: struct_pb2.Value, value: Any) -> None:
    # Struct.update goes through protobuf's generic pure-Python helpers; dispatching on
    # the few JSON types ourselves costs a fraction of that on every allowed check.
    if isinstance(value, str):
        target.string_value = value
    elif isinstance(value, bool):
        target.bool_value = value
    elif isinstance(value, int | float):
        target.number_value = value
    elif value is None:
        target.null_value = struct_pb2.NULL_VALUE
    elif isinstance(value, Mapping):
        fill_struct(target.struct_value, value)
    elif isinstance(value, list | tuple):
        items = target.list_value.values
        for item in value:
            _set_value(items.add(), item)
    else:
        target.string_value = str(value)


def fill_struct(target: struct_pb2.Struct, values: Mapping[str, Any]) -> None:
    """``target.update(values)`` for JSON-like values, without protobuf's slow path."""
    fields = target.fields
    for key, value in values.items():
        _set_value(fields[key], value)


def response_to_proto(decision: Decision) -> external_auth_pb2.CheckResponse:
    response = external_auth_pb2.CheckResponse()
    if decision.dynamic_metadata:
        fill_struct(response.dynamic_metadata, decision.dynamic_metadata)
    if decision.allow:
        response.status.CopyFrom(status_pb2.Status(code=code_pb2.OK))
        ok = response.ok_response
        ok.headers.extend(_header(n, v, OVERWRITE) for n, v in decision.upstream_headers)
        ok.headers_to_remove.extend(decision.headers_to_remove)
        ok.query_parameters_to_remove.extend(decision.query_params_to_remove)
        ok.response_headers_to_add.extend(
            _header(n, v, _repeatable(n)) for n, v in decision.response_headers
        )
        return response
    code = code_pb2.UNAUTHENTICATED if decision.status == 401 else code_pb2.PERMISSION_DENIED
    response.status.CopyFrom(status_pb2.Status(code=code, message=decision.reason))
    denied = response.denied_response
    denied.status.CopyFrom(http_status_pb2.HttpStatus(code=decision.status))  # type: ignore[arg-type]
    denied.headers.extend(_header(n, v, _repeatable(n)) for n, v in decision.response_headers)
    denied.body = decision.body
    return response


#: Responses kept for decisions that come back (see ``AuthorizationServicer``).
RESPONSE_CACHE_ENTRIES = 4096


class AuthorizationServicer:
    """``Check``, served by :meth:`check_wire` as encoded bytes (no response serializer).

    The core hands out the same :class:`Decision` object (``reusable``) for a repeated
    credential (a cached token's, a user's, an API client's allow; a policy's constant
    denials), so its response is encoded once and reused, keyed by the decision object
    (kept alive with it, so its id is not reused while the entry lives)."""

    def __init__(self, decide: Decide) -> None:
        self._decide = decide
        self._responses: dict[int, tuple[Decision, bytes]] = {}

    async def check_wire(
        self, request: external_auth_pb2.CheckRequest, context: grpc.aio.ServicerContext | None
    ) -> bytes:
        decision = await self._decide(request_from_proto(request), "grpc")
        if not decision.reusable:
            return response_to_proto(decision).SerializeToString()
        entry = self._responses.get(id(decision))
        if entry is not None and entry[0] is decision:
            return entry[1]
        encoded = response_to_proto(decision).SerializeToString()
        responses = self._responses
        if len(responses) >= RESPONSE_CACHE_ENTRIES:
            del responses[next(iter(responses))]  # the oldest
        responses[id(decision)] = (decision, encoded)
        return encoded

    async def Check(
        self, request: external_auth_pb2.CheckRequest, context: grpc.aio.ServicerContext | None
    ) -> external_auth_pb2.CheckResponse:
        """The answer as a message (for callers in the process; the server sends bytes)."""
        return external_auth_pb2.CheckResponse.FromString(await self.check_wire(request, context))


def register(server: grpc.aio.Server, decide: Decide) -> None:
    """As ``add_AuthorizationServicer_to_server``, but the handler returns the encoded
    response (no response serializer)."""
    servicer = AuthorizationServicer(decide)
    handlers = {
        "Check": grpc.unary_unary_rpc_method_handler(
            servicer.check_wire,
            request_deserializer=external_auth_pb2.CheckRequest.FromString,
        )
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
