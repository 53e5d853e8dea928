"""Outrider extauth: an Envoy ext_authz server for JWT, OIDC, Basic, API keys and rules."""
