"""The translator's top level: input files → output files (``--target envoy`` or ``gateway``)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import yaml

from . import envoy as envoy_out
from .backend_tls import backend_tls_policies, tls_for
from .backend_traffic import apply_backend_traffic
from .client_traffic import apply_client_traffic, attach_client_traffic
from .csrf import apply_csrf
from .extension import apply_luas
from .extservice import apply_services
from .gatewayapi import (
    BackendResolver,
    build_listeners,
    build_routes,
    resolve_hostname_conflicts,
)
from .l4 import add_listeners, attach_l4_policies, build_l4_routes
from .patch import apply_patches
from .policies import SecretFiles, attach
from .rejections import Rejection, Rejections
from .resources import ResourceSet, load_resources
from .route_filters import apply_route_extras
from .tls import apply_listener_tls, report_not_programmed

DEFAULT_SOCKETS = {
    "ratelimit": "/run/outrider/ratelimit.sock",
    "extauth": "/run/outrider/extauth.sock",
    "extauth-http": "/run/outrider/extauth-http.sock",  # --extauth-mode http
    "extproc": "/run/outrider/extproc.sock",
}


@dataclass(frozen=True)
class Options:
    target: str = "envoy"  # envoy | gateway
    auth: str = "sidecar"  # sidecar | native
    extauth_mode: str = "grpc"  # grpc | http (Envoy's HTTP ext_authz mode on the sidecar)
    ratelimit_mode: str = "rls"  # rls | rlqs (Envoy's rate_limit_quota filter, RLQS)
    backends: dict[str, tuple[str, int]] = field(default_factory=dict)
    sockets: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_SOCKETS))
    listen_address: str = "0.0.0.0"
    admin_port: int = 9901
    port_map: dict[int, int] = field(default_factory=dict)
    secrets_dir: Path = Path("secrets")


#: what ``translate`` writes into OUTDIR (either target), and so may remove from it
OWNED_FILES = (
    "envoy.yaml",
    "extauth.yaml",
    "extproc.yaml",
    "ratelimit/*.yaml",
    "outrider.yaml",
    "configs.yaml",
    "policies.yaml",
    "routes.yaml",
    "kustomization.yaml",
)


@dataclass
class Output:
    """Relative path → file content. Secret files are kept apart (mode 0600)."""

    files: dict[str, str]
    secret_files: dict[str, str]
    #: policies rejected as Envoy Gateway rejects them (the rest translated)
    rejections: list[Rejection] = field(default_factory=list)
    #: accepted policies that did not fully apply (Envoy Gateway's ``Programmed: False``)
    unprogrammed: list[Rejection] = field(default_factory=list)

    def write(self, outdir: Path) -> None:
        """Write every file; files an earlier run wrote that this one does not are removed
        (a stale ``ratelimit/<domain>.yaml`` would otherwise stay in force)."""
        outdir.mkdir(parents=True, exist_ok=True)
        for stale in OWNED_FILES:
            for path in sorted(outdir.glob(stale)):
                rel = path.relative_to(outdir).as_posix()
                if path.is_file() and rel not in self.files and rel not in self.secret_files:
                    path.unlink()
        for rel, text in sorted(self.files.items()):
            path = outdir / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
        for rel, text in sorted(self.secret_files.items()):
            path = outdir / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch(mode=0o600)
            path.chmod(0o600)
            path.write_text(text, encoding="utf-8")


def dump(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, width=100)


def translate_resources(resources: ResourceSet, options: Options) -> Output:
    rejections = Rejections()
    resolver = BackendResolver(resources, options.backends)
    if tls_policies := backend_tls_policies(resources, rejections):
        resolver.tls_lookup = partial(tls_for, tls_policies)
    listeners = build_listeners(resources)
    build_routes(resources, listeners, resolver)
    if options.target != "gateway":  # Envoy Gateway settles its own Gateways' listeners
        resolve_hostname_conflicts(resources, listeners, rejections)
    build_l4_routes(resources, listeners, resolver)
    secret_files = SecretFiles(options.secrets_dir, {})
    chains = attach(resources, listeners, resolver, secret_files, rejections)
    attach_l4_policies(resources, listeners, rejections)
    client = attach_client_traffic(resources, listeners, rejections)
    report_not_programmed(resources, listeners, rejections)
    if options.target == "gateway":
        from .k8s import gateway_manifests  # k8s builds on this module: imported late

        out = gateway_manifests(
            resources, listeners, chains, secret_files, ratelimit_mode=options.ratelimit_mode
        )
        out.rejections = list(rejections.items)
        return out
    config = envoy_out.build(
        listeners,
        resolver.clusters,
        envoy_out.EnvoyOptions(
            sockets=options.sockets,
            listen_address=options.listen_address,
            admin_port=options.admin_port,
            port_map=options.port_map,
            auth=options.auth,
            extauth_mode=options.extauth_mode,
            ratelimit_mode=options.ratelimit_mode,
        ),
    )
    bootstrap = config.to_dict()
    add_listeners(
        bootstrap, listeners, options.listen_address, options.port_map, resolver.service_ips()
    )
    apply_client_traffic(bootstrap, client)
    apply_listener_tls(bootstrap, listeners, client, secret_files)
    apply_backend_traffic(bootstrap, listeners, resolver.service_ips())
    apply_route_extras(bootstrap, listeners)
    apply_luas(bootstrap, listeners)
    apply_services(bootstrap, listeners)
    apply_csrf(bootstrap, listeners)
    apply_patches(bootstrap, resources, rejections)
    files: dict[str, str] = {"envoy.yaml": dump(bootstrap)}
    for name, cfg in config.ratelimit.files().items():
        files[f"ratelimit/{name}"] = dump(cfg)
    policies = {}
    for lst in listeners:
        for route in lst.routes:
            sec = route.security
            if sec is not None and sec.sidecar is not None and options.auth != "native":
                policies[sec.policy] = sec.sidecar
    if policies:
        files["extauth.yaml"] = dump({"policies": dict(sorted(policies.items()))})
    used_chains = sorted(
        {ep.chain for lst in listeners for r in lst.routes for ep in r.ext_procs if ep.chain}
    )
    if used_chains:
        files["extproc.yaml"] = dump({"chains": {c: chains[c] for c in used_chains}})
    secret = {f"secrets/{name}": text for name, text in secret_files.files.items()}
    return Output(files, secret, list(rejections.items), list(rejections.unprogrammed))


def translate(paths: Iterable[Path], options: Options) -> Output:
    return translate_resources(load_resources(paths), options)
