"""``oidc`` policy section parsing: Envoy Gateway field names, clear errors, secrets kept out."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.common.configfile import ConfigError, parse_yaml
from services.extauth.config import load_config
from services.extauth.oidc.config import parse_oidc

COOKIE_SECRET = "0123456789abcdef0123456789abcdef-newest"


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "client").write_text("client-s3cret\n")
    (tmp_path / "cookies").write_text(f"# rotation: newest first\n{COOKIE_SECRET}\n\n{'x' * 40}\n")
    return {"client": str(tmp_path / "client"), "cookies": str(tmp_path / "cookies")}


def _parse(section: dict[str, Any]) -> Any:
    text = yaml.safe_dump({"policies": {"web": {"oidc": section}}})
    node = parse_yaml(text, "policies.yaml")[0].req("policies").req("web").req("oidc")
    return parse_oidc(node)


def _minimal(files: dict[str, str], **extra: Any) -> dict[str, Any]:
    return {
        "provider": {"issuer": "https://idp.example.com"},
        "clientID": "app",
        "clientSecretFile": files["client"],
        "redirectURL": "https://app.example.com/oauth2/callback",
        "cookieSecretFile": files["cookies"],
        **extra,
    }


def test_defaults(files: dict[str, str]) -> None:
    cfg = _parse(_minimal(files))
    assert cfg.scopes == ("openid",)
    assert cfg.logout_path == "/logout"
    assert cfg.redirect_path == "/oauth2/callback"
    assert cfg.refresh_token is True
    assert cfg.csrf_token_ttl == 600
    assert cfg.cookies.session_name == "__Host-outrider-session"
    assert cfg.cookies.secure
    assert cfg.cookies.same_site == "Lax"
    assert cfg.client_secret == "client-s3cret"
    assert cfg.cookie_secrets == (COOKIE_SECRET.encode(), b"x" * 40)  # newest first
    assert cfg.token_endpoint_auth_method == "client_secret_basic"
    assert cfg.session_store == "cookie"


def test_secrets_never_shown(files: dict[str, str]) -> None:
    cfg = _parse(_minimal(files))
    for text in (repr(cfg), str(cfg.describe())):
        assert "client-s3cret" not in text
        assert COOKIE_SECRET not in text


def test_every_option(files: dict[str, str]) -> None:
    cfg = _parse(
        _minimal(
            files,
            provider={
                "issuer": "https://idp.example.com/realms/x",
                "authorizationEndpoint": "https://idp.example.com/auth",
                "tokenEndpoint": "https://idp.example.com/token",
                "endSessionEndpoint": "https://idp.example.com/logout",
                "jwksURI": "https://idp.example.com/jwks",
            },
            scopes=["email", "openid"],
            resources=["https://api.example.com"],
            logoutPath="/signout",
            postLogoutRedirectURL="https://app.example.com/bye",
            tokenEndpointAuthMethod="client_secret_post",
            cookieDomain="example.com",
            cookieConfig={"sameSite": "Strict"},
            csrfTokenTTL="5m",
            forwardAccessToken=True,
            forwardIDToken={"header": "X-ID-Token"},
            refreshToken=False,
            defaultTokenTTL="1h",
            defaultRefreshTokenTTL="24h",
            sessionMaxAge="8h",
            denyRedirect={"headers": [{"name": "X-Api", "type": "Prefix", "value": "v"}]},
            passThroughAuthHeader=True,
            claimToHeaders=[{"claim": "email", "header": "X-Email"}],
            allowedRedirectHosts=["*.example.com"],
            discoveryRefresh="10m",
        )
    )
    assert not cfg.provider.needs_discovery
    assert cfg.scopes == ("email", "openid")
    assert cfg.cookies.session_name == "__Secure-outrider-session"  # Domain set: no __Host-
    assert cfg.cookies.domain == "example.com"
    assert cfg.csrf_token_ttl == 300
    assert cfg.default_token_ttl == 3600
    assert cfg.session_max_age == 8 * 3600
    assert cfg.forward_id_token_header == "x-id-token"
    assert cfg.deny_redirect[0].matches({"x-api": "v2"})
    assert not cfg.deny_redirect[0].matches({"x-api": "w"})
    assert cfg.claim_to_headers[0].header == "x-email"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"provider": {"issuer": "ftp://idp"}}, "oidc.provider.issuer: expected an absolute"),
        ({"provider": {"issuer": "http://idp.example.com"}}, "http only for a loopback"),
        ({"clientSecret": {"name": "s"}}, "oidc.clientSecret: clientSecret (a Kubernetes Secret"),
        ({"clientSecretFile": "/nonexistent/x"}, "oidc.clientSecretFile: cannot read secret file"),
        ({"redirectURL": "/relative"}, "oidc.redirectURL: expected an absolute"),
        ({"logoutPath": "//evil"}, "oidc.logoutPath: expected an absolute path"),
        ({"csrfTokenTTL": "10 minutes"}, "oidc.csrfTokenTTL: expected a duration"),
        ({"cookieConfig": {"sameSite": "Loose"}}, "oidc.cookieConfig.sameSite: expected one of"),
        ({"sessionStore": "redis"}, "sessionStore: redis needs redis.url"),
        ({"disableTokenEncryption": True}, "always encrypts"),
        ({"unknownField": 1}, "oidc.unknownField: unknown field"),
        ({"cookieNames": {"idToken": "x"}}, "cookieNames.idToken"),
        (
            {"forwardAccessToken": True, "forwardIDToken": {"header": "Authorization"}},
            "forwardAccessToken cannot be true",
        ),
        (
            {
                "denyRedirect": {
                    "headers": [{"name": "x", "type": "RegularExpression", "value": "("}]
                }
            },
            "regular expression RE2 accepts",
        ),
        (  # Python's re accepts a lookahead; RE2, as Envoy Gateway, does not
            {
                "denyRedirect": {
                    "headers": [{"name": "x", "type": "RegularExpression", "value": "(?=a)a"}]
                }
            },
            "oidc.denyRedirect.headers[0].value: expected a regular expression RE2 accepts",
        ),
    ],
)
def test_errors_name_file_path_and_expectation(
    files: dict[str, str], change: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        _parse(_minimal(files, **change))
    text = str(info.value)
    assert text.startswith("policies.yaml: policies.web.oidc"), text
    assert message in text, text
    assert "client-s3cret" not in text


def test_short_cookie_secret_is_refused(files: dict[str, str], tmp_path: Path) -> None:
    weak = tmp_path / "weak"
    weak.write_text("short\n")
    with pytest.raises(ConfigError, match="too short"):
        _parse(_minimal(files, cookieSecretFile=str(weak)))
    empty = tmp_path / "empty"
    empty.write_text("# nothing\n")
    with pytest.raises(ConfigError, match="holds no secret"):
        _parse(_minimal(files, cookieSecretFile=str(empty)))


def test_insecure_cookies_only_without_prefixes(files: dict[str, str]) -> None:
    cfg = _parse(_minimal(files, cookieSecure=False))
    assert cfg.cookies.session_name == "outrider-session"
    with pytest.raises(ConfigError, match="__Host- prefix needs cookieSecure"):
        _parse(_minimal(files, cookieSecure=False, cookieNames={"session": "__Host-s"}))


def test_redirect_url_defaults_like_envoy_gateway(files: dict[str, str]) -> None:
    section = _minimal(files)
    del section["redirectURL"]
    cfg = _parse(section)
    assert cfg.redirect_url is None
    assert cfg.redirect_path == "/oauth2/callback"


def test_relative_secret_files_resolve_against_the_config_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same rule as every other file a policy names, never the working directory."""
    confdir, elsewhere = tmp_path / "conf", tmp_path / "elsewhere"
    for base, secret in ((confdir, "right-secret"), (elsewhere, "working-dir-decoy")):
        (base / "secrets").mkdir(parents=True)
        (base / "secrets" / "client").write_text(f"{secret}\n")
        (base / "secrets" / "cookies").write_text(f"{secret}-{'c' * 32}\n")
        (base / "secrets" / "htpasswd").write_text(
            f"alice:{{SHA}}{base64.b64encode(hashlib.sha1(secret.encode()).digest()).decode()}\n"
        )
    section = {
        "provider": {"issuer": "https://idp.example.com"},
        "clientID": "app",
        "clientSecretFile": "secrets/client",
        "cookieSecretFile": "./secrets/cookies",
    }
    policies = {
        "web": {"oidc": section},
        "api": {"basicAuth": {"htpasswdFile": "secrets/htpasswd"}},
    }
    (confdir / "policies.yaml").write_text(yaml.safe_dump({"policies": policies}))
    monkeypatch.chdir(elsewhere)

    config = load_config(Path("../conf"))
    oidc = config.policies["web"].oidc
    assert oidc.client_secret == "right-secret"
    assert oidc.cookie_secrets == (f"right-secret-{'c' * 32}".encode(),)
    assert oidc.client_secret_file == str(confdir.resolve() / "secrets" / "client")
    assert oidc.cookie_secret_file == str(confdir.resolve() / "secrets" / "cookies")
    htpasswd_file = config.policies["api"].basic_auth.file
    assert htpasswd_file is not None
    assert htpasswd_file.parent == confdir.resolve() / "secrets"
    # A change to any of them reloads the config.
    assert {p.name for p in config.referenced_files()} == {"client", "cookies", "htpasswd"}


def test_unreadable_secret_file_error_quotes_no_bytes(
    files: dict[str, str], tmp_path: Path
) -> None:
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xfes3cr3t\xff")
    with pytest.raises(ConfigError) as info:
        _parse(_minimal(files, clientSecretFile=str(binary)))
    text = str(info.value)
    assert "oidc.clientSecretFile: cannot read secret file" in text
    assert "not UTF-8 text" in text
    for leaked in ("s3cr3t", "0xfe", "0xff"):
        assert leaked not in text
