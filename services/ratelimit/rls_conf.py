"""``ratelimit.config.ratelimit.v3.RateLimitConfig``: the rate limit config as xDS carries it.

Envoy Gateway feeds its rate limit deployment over ADS with resources of type
``type.googleapis.com/ratelimit.config.ratelimit.v3.RateLimitConfig``, defined in
envoyproxy/ratelimit's ``api/ratelimit/config/ratelimit/v3/rls_conf.proto``. The
message classes are built here at import time from a descriptor written after that
published definition (same package, message names, field names and numbers), so
nothing generated elsewhere is copied in and no protoc step is needed.

:func:`to_document` turns one resource into the document a YAML file would give
(envoyproxy/ratelimit's ``ConfigXdsProtoToYaml``), so both sources go through the one
validating loader in :mod:`services.ratelimit.config`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from google.protobuf import (
    descriptor_pb2,
    descriptor_pool,
    json_format,
    message_factory,
    struct_pb2,  # noqa: F401 - registers google/protobuf/struct.proto
)

from services.common.configfile import ConfigError, Node

from .config import RateLimitConfig as Config
from .config import parse_documents

PACKAGE = "ratelimit.config.ratelimit.v3"
TYPE_URL = f"type.googleapis.com/{PACKAGE}.RateLimitConfig"

_F = descriptor_pb2.FieldDescriptorProto
_OPTIONAL, _REPEATED = _F.LABEL_OPTIONAL, _F.LABEL_REPEATED


def _field(
    name: str, number: int, kind: int, *, label: int = _OPTIONAL, type_name: str = ""
) -> descriptor_pb2.FieldDescriptorProto:
    json_name = name.split("_")[0] + "".join(p.title() for p in name.split("_")[1:])
    field = _F(name=name, number=number, type=kind, label=label, json_name=json_name)
    if type_name:
        field.type_name = type_name
    return field


def _file() -> descriptor_pb2.FileDescriptorProto:
    """rls_conf.proto, field for field."""
    msg = f".{PACKAGE}."
    file = descriptor_pb2.FileDescriptorProto(
        name="ratelimit/config/ratelimit/v3/rls_conf.proto",
        package=PACKAGE,
        syntax="proto3",
        dependency=["google/protobuf/struct.proto"],
    )
    file.message_type.add(
        name="RateLimitConfig",
        field=[
            _field("name", 1, _F.TYPE_STRING),
            _field("domain", 2, _F.TYPE_STRING),
            _field(
                "descriptors",
                3,
                _F.TYPE_MESSAGE,
                label=_REPEATED,
                type_name=msg + "RateLimitDescriptor",
            ),
        ],
    )
    file.message_type.add(
        name="RateLimitDescriptor",
        field=[
            _field("key", 1, _F.TYPE_STRING),
            _field("value", 2, _F.TYPE_STRING),
            _field("rate_limit", 3, _F.TYPE_MESSAGE, type_name=msg + "RateLimitPolicy"),
            _field(
                "descriptors",
                4,
                _F.TYPE_MESSAGE,
                label=_REPEATED,
                type_name=msg + "RateLimitDescriptor",
            ),
            _field("shadow_mode", 5, _F.TYPE_BOOL),
            _field("detailed_metric", 6, _F.TYPE_BOOL),
            _field("quota_mode", 7, _F.TYPE_BOOL),
            _field("metadata", 8, _F.TYPE_MESSAGE, type_name=".google.protobuf.Struct"),
        ],
    )
    file.message_type.add(
        name="RateLimitPolicy",
        field=[
            _field("unit", 1, _F.TYPE_ENUM, type_name=msg + "RateLimitUnit"),
            _field("requests_per_unit", 2, _F.TYPE_UINT32),
            _field("unlimited", 3, _F.TYPE_BOOL),
            _field("name", 4, _F.TYPE_STRING),
            _field(
                "replaces",
                5,
                _F.TYPE_MESSAGE,
                label=_REPEATED,
                type_name=msg + "RateLimitReplace",
            ),
        ],
    )
    file.message_type.add(name="RateLimitReplace", field=[_field("name", 1, _F.TYPE_STRING)])
    unit = file.enum_type.add(name="RateLimitUnit")
    for name, number in (
        ("UNKNOWN", 0),
        ("SECOND", 1),
        ("MINUTE", 2),
        ("HOUR", 3),
        ("DAY", 4),
        ("WEEK", 7),
        ("MONTH", 5),
        ("YEAR", 6),
    ):
        unit.value.add(name=name, number=number)
    return file


def _messages() -> dict[str, Any]:
    pool = descriptor_pool.Default()
    try:
        file = pool.FindFileByName(_file().name)
    except KeyError:
        file = pool.Add(_file())
    return {
        name: message_factory.GetMessageClass(file.message_types_by_name[name])
        for name in file.message_types_by_name
    }


_CLASSES = _messages()
RateLimitConfig = _CLASSES["RateLimitConfig"]
RateLimitDescriptor = _CLASSES["RateLimitDescriptor"]
RateLimitPolicy = _CLASSES["RateLimitPolicy"]
RateLimitReplace = _CLASSES["RateLimitReplace"]
UNIT_NAMES = {
    v.number: v.name for v in RateLimitPolicy.DESCRIPTOR.fields_by_name["unit"].enum_type.values
}


def _descriptor(d: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"key": d.key, "value": d.value}
    if d.HasField("rate_limit"):
        p = d.rate_limit
        out["rate_limit"] = {
            "requests_per_unit": p.requests_per_unit,
            # an enum value this definition does not know reads as UNKNOWN, as in Go
            "unit": UNIT_NAMES.get(p.unit, "UNKNOWN"),
            "unlimited": p.unlimited,
            "name": p.name,
            "replaces": [{"name": r.name} for r in p.replaces],
        }
    out["descriptors"] = [_descriptor(c) for c in d.descriptors]
    out["shadow_mode"] = d.shadow_mode
    out["detailed_metric"] = d.detailed_metric
    out["quota_mode"] = d.quota_mode
    if d.HasField("metadata"):
        out["metadata"] = json_format.MessageToDict(d.metadata)
    return out


def to_document(config: Any, where: str) -> Node:
    """One ``RateLimitConfig`` as the YAML document of a file named ``where``."""
    return Node(
        {"domain": config.domain, "descriptors": [_descriptor(d) for d in config.descriptors]},
        where,
    )


def parse_resources(
    resources: Sequence[Any], version: str, *, merge_domains: bool = False
) -> Config:
    """One xDS response's resources (``google.protobuf.Any``, one domain each) → the
    config, through the same loader and checks as files. Errors name the resource."""
    documents = []
    for i, resource in enumerate(resources):
        message = RateLimitConfig()
        if not resource.Unpack(message):
            where = f"xDS resource [{i}] (version {version!r})"
            raise ConfigError(where, "", f"expected {TYPE_URL}, got {resource.type_url}")
        documents.append(to_document(message, f"xDS resource {message.name!r}"))
    return parse_documents(documents, merge_domains=merge_domains)


def from_document(document: dict[str, Any], name: str = "") -> Any:
    """A ``RateLimitConfig`` from a YAML document of the file format (tests, tools)."""

    def policy(p: dict[str, Any]) -> Any:
        return RateLimitPolicy(
            unit=str(p.get("unit") or "UNKNOWN").upper(),
            requests_per_unit=p.get("requests_per_unit") or 0,
            unlimited=bool(p.get("unlimited")),
            name=p.get("name") or "",
            replaces=[RateLimitReplace(name=r["name"]) for r in p.get("replaces") or ()],
        )

    def descriptor(d: dict[str, Any]) -> Any:
        out = RateLimitDescriptor(
            key=str(d.get("key") or ""),
            value=str(d.get("value") or ""),
            descriptors=[descriptor(c) for c in d.get("descriptors") or ()],
            shadow_mode=bool(d.get("shadow_mode")),
            detailed_metric=bool(d.get("detailed_metric")),
            quota_mode=bool(d.get("quota_mode")),
        )
        if d.get("rate_limit") is not None:
            out.rate_limit.CopyFrom(policy(d["rate_limit"]))
        if d.get("metadata"):
            out.metadata.update(d["metadata"])
        return out

    return RateLimitConfig(
        name=name or str(document.get("name") or document.get("domain") or ""),
        domain=str(document.get("domain") or ""),
        descriptors=[descriptor(d) for d in document.get("descriptors") or ()],
    )
