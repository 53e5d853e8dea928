"""What the translator's behaviour and meaning tests share: the Gateway API input they build
on, and "translate this, then serve it with the real Envoy".

- ``gateway_and_route``: the Gateway ``eg`` (one HTTP listener on 8080) and the HTTPRoute
  ``app`` with one named rule per path prefix (or a single rule for every path), every rule
  to the backend ``up:80``; the policies under test target those rules by ``sectionName``;
- ``translated_envoy``: translate the input for loopback (the given backends, listener
  ports mapped to free ones), check nothing was rejected, write the output and start the
  real Envoy on it (``tests.harness.envoy.EnvoyProcess``); stopped on leaving the block.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.harness.envoy import EnvoyProcess
from tests.harness.procs import free_port
from translator.translate import Options, Output, translate

GATEWAY = """\
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: eg, namespace: default}
spec:
  gatewayClassName: eg
  listeners: [{name: http, protocol: HTTP, port: 8080}]
"""


def documents(*docs: str) -> str:
    """YAML documents, separated by ``---``."""
    return "---\n".join(doc if doc.endswith("\n") else doc + "\n" for doc in docs)


Rule = str | tuple[str, str]


def http_route(*rules: Rule, name: str = "app", backend: str = "up") -> str:
    """An HTTPRoute on the Gateway ``eg`` with a named rule per ``rules`` entry, each to
    ``backend`` port 80: ``"retry"`` matches the path prefix ``/retry``, ``("plain", "/")``
    the prefix ``/``. Without ``rules``: one rule, for every request."""
    lines = [
        "apiVersion: gateway.networking.k8s.io/v1",
        "kind: HTTPRoute",
        f"metadata: {{name: {name}, namespace: default}}",
        "spec:",
        "  parentRefs: [{name: eg}]",
        "  rules:" if rules else f"  rules: [{{backendRefs: [{{name: {backend}, port: 80}}]}}]",
    ]
    for rule in rules:
        rule_name, prefix = (rule, f"/{rule}") if isinstance(rule, str) else rule
        lines += [
            f"    - name: {rule_name}",
            f"      matches: [{{path: {{type: PathPrefix, value: {prefix}}}}}]",
            f"      backendRefs: [{{name: {backend}, port: 80}}]",
        ]
    return "\n".join(lines) + "\n"


def gateway_and_route(*rules: Rule, backend: str = "up") -> str:
    """The Gateway ``eg`` and its HTTPRoute ``app`` (``http_route``)."""
    return documents(GATEWAY, http_route(*rules, backend=backend))


@dataclass(frozen=True)
class Served:
    """The translated input, served by a running Envoy."""

    out: Output
    out_dir: Path
    #: the input's listener port -> the loopback port Envoy listens on
    ports: Mapping[int, int]
    #: the Envoy admin URL
    admin: str
    proxy: EnvoyProcess

    @property
    def base(self) -> str:
        """``http://127.0.0.1:PORT`` of the first listener port."""
        return f"http://127.0.0.1:{next(iter(self.ports.values()))}"


@contextmanager
def translated_envoy(
    tmp_path: Path,
    resources: str,
    *,
    backends: Mapping[str, tuple[str, int]],
    ports: Iterable[int] = (8080,),
    before_envoy: Callable[[Path], object] | None = None,
    **options: Any,
) -> Iterator[Served]:
    """Translate ``resources`` for loopback, write it to ``tmp_path/out`` and serve it with
    the real Envoy until the block ends. ``before_envoy(out_dir)`` starts what Envoy calls
    (sidecars); ``options`` are further translator ``Options``."""
    source = tmp_path / "in.yaml"
    source.write_text(resources)
    port_map = {p: free_port() for p in ports}
    admin_port = free_port()
    out_dir = tmp_path / "out"
    out = translate(
        [source],
        Options(
            **{
                "backends": dict(backends),
                "listen_address": "127.0.0.1",
                "admin_port": admin_port,
                "port_map": port_map,
                "secrets_dir": out_dir / "secrets",
                **options,
            }
        ),
    )
    assert not out.rejections, [str(r) for r in out.rejections]
    out.write(out_dir)
    if before_envoy is not None:
        before_envoy(out_dir)
    proxy = EnvoyProcess(out.files["envoy.yaml"])
    try:
        proxy.start()
        yield Served(out, out_dir, port_map, f"http://127.0.0.1:{admin_port}", proxy)
    finally:
        proxy.stop()
