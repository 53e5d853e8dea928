"""Transports: Envoy's gRPC ext_authz (``grpc``) and HTTP ext_authz (``http``) ↔ core types."""
