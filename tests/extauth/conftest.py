"""Fixtures of the extauth tests: signing keys and a real JWKS HTTP server on loopback."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.extauth.helpers import JWKSServer, SigningKey, ec_key, rsa_key


@pytest.fixture(scope="session")
def rsa1() -> SigningKey:
    return rsa_key("rsa-1")


@pytest.fixture(scope="session")
def rsa2() -> SigningKey:
    return rsa_key("rsa-2")


@pytest.fixture(scope="session")
def ec1() -> SigningKey:
    return ec_key("ec-1")


@pytest.fixture
def jwks_server() -> Iterator[JWKSServer]:
    server = JWKSServer().start()
    yield server
    server.stop()
