"""Invalid or unsupported input: an error naming the file, the YAML path and the resource."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from translator.resources import TranslateError
from translator.translate import Options, translate

GATEWAY = """\
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: eg, namespace: default}
spec:
  listeners: [{name: http, protocol: HTTP, port: 8080}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r, namespace: default}
spec:
  parentRefs: [{name: eg}]
  rules: [{backendRefs: [{name: s, port: 80}]}]
---
"""


SELECTOR = "        - {{clientSelectors: [{}], limit: {{requests: 1, unit: Second}}}}"


def btp(
    rule: str, target: str = "{group: gateway.networking.k8s.io, kind: HTTPRoute, name: r}"
) -> str:
    return f"""\
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: BackendTrafficPolicy
metadata: {{name: p, namespace: default}}
spec:
  targetRefs: [{target}]
  rateLimit:
    type: Global
    global:
      rules:
{rule}
"""


def fail(tmp_path: Path, text: str) -> TranslateError:
    """The error that stops the translation, or else the first policy it rejects."""
    f = tmp_path / "in.yaml"
    f.write_text(GATEWAY + text)
    try:
        out = translate([f], Options(secrets_dir=tmp_path / "s"))
    except TranslateError as exc:
        return exc
    assert out.rejections, "neither an error nor a rejected policy"
    return out.rejections[0].error


@pytest.mark.parametrize(
    ("text", "path", "words"),
    [
        (
            btp("        - {limit: {requests: 1, unit: Fortnight}}"),
            "spec.rateLimit.global.rules[0].limit.unit",
            ["BackendTrafficPolicy default/p", "Fortnight", "Second"],
        ),
        (
            btp(SELECTOR.format("{sourceCIDR: {value: 10.0.0.300/8}}")),
            "spec.rateLimit.global.rules[0].clientSelectors[0].sourceCIDR.value",
            ["CIDR", "10.0.0.300/8"],
        ),
        (
            btp(SELECTOR.format("{headers: [{name: x, type: RegularExpression, value: 'a(b'}]}")),
            "spec.rateLimit.global.rules[0].clientSelectors[0].headers[0].value",
            ["invalid regular expression"],
        ),
        (  # Python's re takes a lookahead, Envoy's RE2 does not
            btp(SELECTOR.format("{headers: [{name: x, type: RegularExpression, value: 'a(?=)'}]}")),
            "spec.rateLimit.global.rules[0].clientSelectors[0].headers[0].value",
            ["invalid regular expression", "RE2"],
        ),
        (
            btp(
                "        - {limit: {requests: 1, unit: Second}}",
                "{group: gateway.networking.k8s.io, kind: HTTPRoute, name: missing}",
            ),
            "spec.targetRefs[0].name",
            ["HTTPRoute default/missing is not in the input"],
        ),
        (
            btp(SELECTOR.format("{headers: [{name: x, type: Distinct, invert: true}]}")),
            "spec.rateLimit.global.rules[0].clientSelectors[0].headers[0].invert",
            ["not applicable"],
        ),
        (
            """\
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: BackendTrafficPolicy
metadata: {name: p, namespace: default}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: HTTPRoute, name: r}]
  connection: {socketBufferLimit: 1Mi}
""",
            "spec.connection.socketBufferLimit",
            ["BackendTrafficPolicy default/p", "socketBufferLimit is not supported"],
        ),
        (
            """\
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: SecurityPolicy
metadata: {name: sp, namespace: default}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: HTTPRoute, name: r}]
  basicAuth: {users: {name: nope}}
""",
            "spec.basicAuth.users.name",
            ["SecurityPolicy default/sp", "no Secret default/nope"],
        ),
        (
            """\
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TLSRoute
metadata: {name: g, namespace: default}
spec: {}
""",
            "kind",
            ["TLSRoute default/g", "not supported"],
        ),
    ],
)
def test_error_names_file_path_and_resource(
    tmp_path: Path, text: str, path: str, words: list[str]
) -> None:
    err = fail(tmp_path, text)
    assert err.file == str(tmp_path / "in.yaml")
    assert err.path == path, str(err)
    for w in words:
        assert w in str(err)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.common.cli", "translate", *args],
        capture_output=True,
        text=True,
        timeout=300,  # a bound, not a measure: the CLI imports slowly on a busy machine
        check=False,
    )


def test_cli_rejects_the_invalid_policy_and_translates_the_rest(tmp_path: Path) -> None:
    """Envoy Gateway's way: the invalid policy is rejected (printed with file, path, resource
    and reason), the route it targets answers 500, everything else is written; exit 0."""
    f = tmp_path / "in.yaml"
    f.write_text(GATEWAY + btp("        - {limit: {requests: 1, unit: Fortnight}}"))
    proc = _cli("-f", str(f), "-o", str(tmp_path / "out"), "--backend", "s=127.0.0.1:9000")
    assert proc.returncode == 0, proc.stderr
    assert (
        f"rejected BackendTrafficPolicy default/p: {f}: spec.rateLimit.global.rules[0].limit.unit:"
        f" BackendTrafficPolicy default/p: expected a unit" in proc.stderr
    )
    envoy = yaml.safe_load((tmp_path / "out" / "envoy.yaml").read_text())
    routes = envoy["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"
    ]["route_config"]["virtual_hosts"][0]["routes"]
    assert [r.get("direct_response") for r in routes] == [{"status": 500}]
    assert not (tmp_path / "out" / "ratelimit").exists()


def test_cli_strict_exits_2_with_the_message(tmp_path: Path) -> None:
    f = tmp_path / "in.yaml"
    f.write_text(GATEWAY + btp("        - {limit: {requests: 1, unit: Fortnight}}"))
    proc = _cli("-f", str(f), "-o", str(tmp_path / "out"), "--strict")
    assert proc.returncode == 2, proc.stderr
    assert (
        f"{f}: spec.rateLimit.global.rules[0].limit.unit: BackendTrafficPolicy default/p"
        in proc.stderr
    )
    assert not (tmp_path / "out").exists()


def test_cli_exits_2_on_an_invalid_route(tmp_path: Path) -> None:
    f = tmp_path / "in.yaml"
    f.write_text(GATEWAY.replace("port: 80}", "port: 0}"))
    proc = _cli("-f", str(f), "-o", str(tmp_path / "out"))
    assert proc.returncode == 2, proc.stderr
    assert f"{f}: spec.rules[0].backendRefs[0].port: expected an integer" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_cli_writes_outputs(tmp_path: Path) -> None:
    f = tmp_path / "in.yaml"
    f.write_text(GATEWAY + btp("        - {limit: {requests: 1, unit: Second}}"))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.common.cli",
            "translate",
            "-f",
            str(f),
            "-o",
            str(tmp_path / "out"),
            "--backend",
            "s=127.0.0.1:9000",
        ],
        capture_output=True,
        text=True,
        timeout=300,  # a bound, not a measure: the CLI imports slowly on a busy machine
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "envoy.yaml").exists()
    assert (tmp_path / "out" / "ratelimit" / "default_eg_http.yaml").exists()


def test_translating_again_removes_stale_files_and_keeps_the_cookie_key(tmp_path: Path) -> None:
    out = tmp_path / "out"
    f = tmp_path / "in.yaml"
    f.write_text(GATEWAY + btp("        - {limit: {requests: 1, unit: Second}}"))
    oidc = tmp_path / "oidc.yaml"
    oidc.write_text(
        """\
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: SecurityPolicy
metadata: {name: login, namespace: default}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: HTTPRoute, name: r}]
  oidc:
    provider: {issuer: "https://idp.example"}
    clientID: app
    clientSecret: {name: oidc}
    redirectURL: "https://app.example/oauth2/callback"
---
apiVersion: v1
kind: Secret
metadata: {name: oidc, namespace: default}
stringData: {client-secret: s3cret}
"""
    )
    options = Options(secrets_dir=out / "secrets")
    translate([f, oidc], options).write(out)
    assert (out / "ratelimit" / "default_eg_http.yaml").exists()
    cookie = (out / "secrets" / "default_login_cookie-secret").read_text()
    (out / "ratelimit" / "default_old_domain.yaml").write_text("domain: old\n")
    f.write_text(GATEWAY)  # the rate limit policy is gone
    translate([f, oidc], options).write(out)
    assert not (out / "ratelimit" / "default_eg_http.yaml").exists()
    assert not (out / "ratelimit" / "default_old_domain.yaml").exists()
    assert (out / "secrets" / "default_login_cookie-secret").read_text() == cookie
    assert (out / "secrets" / "default_login_cookie-secret").stat().st_mode & 0o077 == 0


def test_gateway_target_refuses_a_resource_it_would_generate(tmp_path: Path) -> None:
    f = tmp_path / "in.yaml"
    f.write_text(
        GATEWAY
        + """\
apiVersion: gateway.envoyproxy.io/v1alpha1
kind: Backend
metadata: {name: outrider-extauth, namespace: default}
spec: {endpoints: [{unix: {path: /run/outrider/extauth.sock}}]}
"""
    )
    with pytest.raises(TranslateError) as info:
        translate([f], Options(target="gateway", secrets_dir=tmp_path / "s"))
    message = str(info.value)
    assert info.value.file == str(f)
    assert "Backend default/outrider-extauth" in message
    assert "rename or remove this one" in message
