"""envoyproxy/ratelimit's environment, read as ``outrider ratelimit`` flags.

The Outrider image's ``/bin/ratelimit`` runs this module, so the image can replace
envoyproxy/ratelimit where that is started by environment variables (Envoy Gateway's
rate limit Deployment sets ``CONFIG_TYPE=GRPC_XDS_SOTW``, TLS, Redis, Prometheus, ...).
Each variable means what envoyproxy/ratelimit's ``src/settings/settings.go`` says, with
its defaults; :func:`translate` turns the environment into ``outrider ratelimit``
options and nothing else, so the service runs the one code path the CLI runs.

- A variable Outrider cannot honour (statsd, tracing, memcache, quota mode, ...) set to
  a value that asks for it is a start-up error naming it (exit 2).
- A variable that only tunes upstream's implementation (pool sizes, pipelining,
  connection ages) is accepted and reported as not applied.
- An option given as a flag, or as its ``OUTRIDER_*`` variable, wins over the mapping.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from urllib.parse import quote, urlencode

from services.common.cli import env_name

#: Variables accepted without effect: they tune envoyproxy/ratelimit's own machinery.
NOT_APPLIED: Mapping[str, str] = {
    "DEBUG_HOST": "no debug listener (the admin address serves /config)",
    "DEBUG_PORT": "no debug listener (the admin address serves /config)",
    "GRPC_MAX_CONNECTION_AGE": "connections are not cycled",
    "GRPC_MAX_CONNECTION_AGE_GRACE": "connections are not cycled",
    "GRPC_SERVER_TLS_CA_CERT": "not an envoyproxy/ratelimit variable (client CA: "
    "GRPC_CLIENT_TLS_CACERT)",
    "CONFIG_GRPC_XDS_SERVER_CONNECT_RETRY_INTERVAL": "covered by the xDS backoff",
    "XDS_CLIENT_BACKOFF_RANDOM_FACTOR": "the xDS backoff doubles, with jitter",
    "XDS_CLIENT_BACKOFF_JITTER": "the xDS backoff always has jitter",
    "STATSD_HOST": "no statsd",
    "STATSD_PORT": "no statsd",
    "EXTRA_TAGS": "no statsd",
    "STATS_FLUSH_INTERVAL": "Prometheus is scraped, not flushed",
    "USE_DOG_STATSD_MOGRIFIERS": "no statsd",
    "DISABLE_STATS": "metrics are served only where USE_PROMETHEUS asks",
    "PROMETHEUS_MAPPER_YAML": "Outrider's metrics have their own names (docs/ratelimit.md)",
    "PROMETHEUS_RESPONSE_TIME_AS_MILLISECONDS": "latencies are histograms in seconds",
    "REDIS_POOL_SIZE": "one auto-pipelined connection (--redis-connections)",
    "REDIS_PERSECOND_POOL_SIZE": "one auto-pipelined connection",
    "REDIS_PIPELINE_WINDOW": "calls in flight are always pipelined",
    "REDIS_PIPELINE_LIMIT": "calls in flight are always pipelined",
    "REDIS_PERSECOND_PIPELINE_WINDOW": "calls in flight are always pipelined",
    "REDIS_PERSECOND_PIPELINE_LIMIT": "calls in flight are always pipelined",
    "REDIS_CLUSTER_PIPELINE_PARALLELISM": "cluster batches are grouped per node",
    "REDIS_PERSECOND_CLUSTER_PIPELINE_PARALLELISM": "cluster batches are grouped per node",
    "REDIS_HEALTH_CHECK_ACTIVE_CONNECTION": "readiness always includes Redis",
    "REDIS_STARTUP_INITIAL_INTERVAL": "starts at once; not ready until Redis answers",
    "REDIS_STARTUP_MAX_INTERVAL": "starts at once; not ready until Redis answers",
    "REDIS_STARTUP_MAX_ELAPSED_TIME": "starts at once; not ready until Redis answers",
    "TRACING_SERVICE_NAME": "no tracing",
    "TRACING_SERVICE_NAMESPACE": "no tracing",
    "TRACING_SERVICE_INSTANCE_ID": "no tracing",
    "TRACING_EXPORTER_PROTOCOL": "no tracing",
    "TRACING_SAMPLING_RATE": "no tracing",
}

#: Variables that, when they ask for the feature, cannot be served: (test, why).
UNSUPPORTED_TRUE = {
    "USE_STATSD": "Outrider has no statsd sink; use USE_PROMETHEUS=true",
    "USE_DOG_STATSD": "Outrider has no statsd sink; use USE_PROMETHEUS=true",
    "TRACING_ENABLED": "Outrider does not export traces",
    "QUOTA_MODE": "global quota mode is not implemented",
    "RESPONSE_DYNAMIC_METADATA": "dynamic metadata in responses is not implemented",
}
UNSUPPORTED_SET = {
    "GRPC_CLIENT_TLS_SAN": "client certificate SAN checks are not implemented "
    "(GRPC_CLIENT_TLS_CACERT verifies the issuer)",
    "CONFIG_GRPC_XDS_NODE_METADATA": "xDS node metadata is not sent",
    "CONFIG_GRPC_XDS_CLIENT_ADDITIONAL_HEADERS": "extra xDS request headers are not sent",
    "REDIS_SENTINEL_AUTH": "Sentinel's own password is not supported",
    "REDIS_PERSECOND_SENTINEL_AUTH": "Sentinel's own password is not supported",
    "MEMCACHE_HOST_PORT": "no memcached backend",
    "MEMCACHE_SRV": "no memcached backend",
}


class UpstreamEnvError(Exception):
    """A variable that cannot be honoured; the message names it."""


def go_bool(name: str, text: str) -> bool:
    """strconv.ParseBool, as envconfig reads booleans."""
    if text in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if text in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    raise UpstreamEnvError(f"{name}={text!r}: expected true or false")


def go_int(name: str, text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise UpstreamEnvError(f"{name}={text!r}: expected a whole number") from None


_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def go_duration(name: str, text: str) -> float:
    """time.ParseDuration ("10s", "1m30s", "250ms") in seconds."""
    if text == "0":
        return 0.0
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise UpstreamEnvError(f"{name}={text!r}: expected a duration such as 10s or 250ms")
    return sum(float(n) * _UNITS[u] for n, u in parts)


def host_port(host: str, port: int) -> str:
    host = host or "0.0.0.0"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass
class Translation:
    #: (option, values): the option once per value (repeatable options), or a flag alone.
    #: A value-taking option repeated here is a repeatable one (``--admin``).
    options: list[tuple[str, list[str]]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, option: str, *values: str) -> None:
        self.options.append((option, list(values)))

    def argv(self, given: Sequence[str], environ: Mapping[str, str]) -> list[str]:
        """The options, minus those given as flags or as OUTRIDER_* variables."""
        out: list[str] = []
        for option, values in self.options:
            if env_name(option) in environ or any(
                token == option or token.startswith(option + "=") for token in given
            ):
                continue
            if not values:
                out.append(option)
            for value in values:
                out += [option, value]
        return out


class _Env:
    def __init__(self, environ: Mapping[str, str]) -> None:
        self.environ = environ

    def has(self, name: str) -> bool:
        return name in self.environ

    def str(self, name: str, default: str = "") -> str:
        return self.environ.get(name, default)

    def bool(self, name: str, default: bool = False) -> bool:
        return go_bool(name, self.environ[name]) if name in self.environ else default

    def int(self, name: str, default: int) -> int:
        return go_int(name, self.environ[name]) if name in self.environ else default

    def duration(self, name: str, default: float) -> float:
        return go_duration(name, self.environ[name]) if name in self.environ else default


def redis_url(env: _Env, prefix: str) -> str | None:
    """REDIS_* (or REDIS_PERSECOND_*) as an Outrider ``--redis-url``; None without a URL."""
    url = env.str(f"{prefix}_URL")
    if not url:
        return None
    if "://" in url:  # already a URL (not upstream's syntax, but unambiguous)
        return url
    socket_type = env.str(f"{prefix}_SOCKET_TYPE", "unix").lower()
    kind = env.str(f"{prefix}_TYPE", "SINGLE").lower()
    auth = env.str(f"{prefix}_AUTH")
    tls = env.bool(f"{prefix}_TLS")
    userinfo = ""
    if auth:
        user, sep, password = auth.partition(":")
        userinfo = (
            f"{quote(user, safe='')}:{quote(password, safe='')}@"
            if sep
            else (f":{quote(auth, safe='')}@")
        )
    # TLS files are REDIS_TLS_* for both stores, as upstream reads them.
    cert, key = env.str("REDIS_TLS_CLIENT_CERT"), env.str("REDIS_TLS_CLIENT_KEY")
    ca = env.str("REDIS_TLS_CACERT")
    skip = env.bool("REDIS_TLS_SKIP_HOSTNAME_VERIFICATION")
    tls_query: dict[str, str] = {}
    if tls:
        if cert and key:
            tls_query.update(ssl_certfile=cert, ssl_keyfile=key)
        if ca:
            tls_query["ssl_ca_certs"] = ca
        if skip:
            tls_query["ssl_check_hostname"] = "false"
    if kind == "single":
        if socket_type == "unix":
            if tls:
                raise UpstreamEnvError(f"{prefix}_TLS=true with {prefix}_SOCKET_TYPE=unix")
            query = {"password": auth} if auth else {}
            return f"unix://{url}" + (f"?{urlencode(query)}" if query else "")
        if socket_type != "tcp":
            raise UpstreamEnvError(f"{prefix}_SOCKET_TYPE={socket_type!r}: expected tcp or unix")
        scheme = "rediss" if tls else "redis"
        return f"{scheme}://{userinfo}{url}" + (f"?{urlencode(tls_query)}" if tls_query else "")
    if kind == "cluster":
        if set(tls_query) - {"ssl"}:
            raise UpstreamEnvError(
                f"{prefix}_TYPE=cluster with TLS certificate or hostname settings: "
                "Outrider's Redis Cluster client takes TLS on or off only"
            )
        return f"redis+cluster://{userinfo}{url}" + ("?ssl=true" if tls else "")
    if kind == "sentinel":
        if tls:
            raise UpstreamEnvError(f"{prefix}_TYPE=sentinel with {prefix}_TLS=true")
        master, _, hosts = url.partition(",")
        if not hosts:
            raise UpstreamEnvError(
                f"{prefix}_URL={url!r}: with {prefix}_TYPE=sentinel expected "
                "MASTER,HOST:PORT[,HOST:PORT...]"
            )
        return f"redis+sentinel://{userinfo}{hosts}/{master}"
    raise UpstreamEnvError(f"{prefix}_TYPE={kind!r}: expected SINGLE, CLUSTER or SENTINEL")


def translate(environ: Mapping[str, str]) -> Translation:
    """envoyproxy/ratelimit's environment → ``outrider ratelimit`` options."""
    env = _Env(environ)
    out = Translation()
    for name, why in UNSUPPORTED_TRUE.items():
        if env.bool(name):
            raise UpstreamEnvError(f"{name}=true: {why}")
    for name, why in UNSUPPORTED_SET.items():
        if env.str(name):
            raise UpstreamEnvError(f"{name} is set: {why}")
    backend = env.str("BACKEND_TYPE", "redis").lower()
    if backend != "redis":
        raise UpstreamEnvError(f"BACKEND_TYPE={backend!r}: Outrider stores counters in Redis")
    for name in ("REDIS_POOL_ON_EMPTY_BEHAVIOR", "REDIS_PERSECOND_POOL_ON_EMPTY_BEHAVIOR"):
        if env.str(name, "WAIT").upper() != "WAIT":
            raise UpstreamEnvError(f"{name}={env.str(name)!r}: only WAIT is supported")
    for name, default in (
        ("LIMIT_LIMIT_HEADER", "RateLimit-Limit"),
        ("LIMIT_REMAINING_HEADER", "RateLimit-Remaining"),
        ("LIMIT_RESET_HEADER", "RateLimit-Reset"),
    ):
        if env.str(name, default) != default:
            raise UpstreamEnvError(f"{name}={env.str(name)!r}: only {default} is supported")
    if env.str("PROMETHEUS_PATH", "/metrics") != "/metrics":
        raise UpstreamEnvError(
            f"PROMETHEUS_PATH={env.str('PROMETHEUS_PATH')!r}: metrics are served at /metrics"
        )

    # -- listeners ------------------------------------------------------------------------
    if env.str("GRPC_UDS"):
        out.add("--listen", f"unix:{env.str('GRPC_UDS')}")
    else:
        out.add("--listen", host_port(env.str("GRPC_HOST", "0.0.0.0"), env.int("GRPC_PORT", 8081)))
    admin = [host_port(env.str("HOST", "0.0.0.0"), env.int("PORT", 8080))]
    if env.bool("USE_PROMETHEUS"):
        host, _, port = env.str("PROMETHEUS_ADDR", ":9090").rpartition(":")
        metrics = host_port(host.strip("[]"), go_int("PROMETHEUS_ADDR", port))
        if metrics not in admin:
            admin.append(metrics)
    out.add("--admin", *admin)
    if env.bool("GRPC_SERVER_USE_TLS"):
        cert, key = env.str("GRPC_SERVER_TLS_CERT"), env.str("GRPC_SERVER_TLS_KEY")
        if not cert or not key:
            raise UpstreamEnvError(
                "GRPC_SERVER_USE_TLS=true needs GRPC_SERVER_TLS_CERT and GRPC_SERVER_TLS_KEY"
            )
        out.add("--tls-cert", cert)
        out.add("--tls-key", key)
        if env.str("GRPC_CLIENT_TLS_CACERT"):
            out.add("--tls-client-ca", env.str("GRPC_CLIENT_TLS_CACERT"))

    # -- logging --------------------------------------------------------------------------
    level = env.str("LOG_LEVEL", "WARN").lower()
    levels = {"trace": "debug", "debug": "debug", "info": "info", "warn": "warning"}
    levels |= {"warning": "warning", "error": "error", "fatal": "error", "panic": "error"}
    if level not in levels:
        raise UpstreamEnvError(f"LOG_LEVEL={level!r}: expected one of {', '.join(levels)}")
    out.add("--log-level", levels[level])
    out.add("--log-format", "json" if env.str("LOG_FORMAT", "text").lower() == "json" else "text")

    # -- config ---------------------------------------------------------------------------
    config_type = env.str("CONFIG_TYPE", "FILE").upper()
    if config_type == "FILE":
        root = env.str("RUNTIME_ROOT", "/srv/runtime_data/current").rstrip("/")
        parts = [root, env.str("RUNTIME_SUBDIRECTORY"), env.str("RUNTIME_APPDIRECTORY", "config")]
        out.add("--config", "/".join(p.strip("/") if i else p for i, p in enumerate(parts) if p))
    elif config_type == "GRPC_XDS_SOTW":
        server = env.str("CONFIG_GRPC_XDS_SERVER_URL", "localhost:18000")
        if env.bool("CONFIG_GRPC_XDS_SERVER_USE_TLS"):
            out.add("--config-xds", f"grpcs://{server}")
            for var, option in (
                ("CONFIG_GRPC_XDS_SERVER_TLS_CACERT", "--xds-ca"),
                ("CONFIG_GRPC_XDS_CLIENT_TLS_CERT", "--xds-cert"),
                ("CONFIG_GRPC_XDS_CLIENT_TLS_KEY", "--xds-key"),
                ("CONFIG_GRPC_XDS_SERVER_TLS_SAN", "--xds-server-name"),
            ):
                if env.str(var):
                    out.add(option, env.str(var))
        else:
            out.add("--config-xds", server)
        out.add("--xds-node-id", env.str("CONFIG_GRPC_XDS_NODE_ID", "default"))
        if env.has("XDS_CLIENT_BACKOFF_INITIAL_INTERVAL") or env.has(
            "XDS_CLIENT_BACKOFF_MAX_INTERVAL"
        ):
            initial = env.duration("XDS_CLIENT_BACKOFF_INITIAL_INTERVAL", 10.0)
            most = env.duration("XDS_CLIENT_BACKOFF_MAX_INTERVAL", 60.0)
            out.add("--xds-backoff-initial", f"{initial:g}")
            out.add("--xds-backoff-max", f"{most:g}")
        if env.int("XDS_CLIENT_MAX_MSG_SIZE_IN_BYTES", 0):
            out.add("--xds-max-message-bytes", str(env.int("XDS_CLIENT_MAX_MSG_SIZE_IN_BYTES", 0)))
        if env.bool("FORCE_START_WITHOUT_INITIAL_CONFIG") and not env.bool(
            "HEALTHY_WITH_AT_LEAST_ONE_CONFIG_LOADED"
        ):
            out.add("--force-start-without-initial-config")
    else:
        raise UpstreamEnvError(f"CONFIG_TYPE={config_type!r}: expected FILE or GRPC_XDS_SOTW")
    if env.bool("MERGE_DOMAIN_CONFIG"):
        out.add("--merge-domain-config")

    # -- limits and counters --------------------------------------------------------------
    url = redis_url(env, "REDIS")
    if url is not None:
        out.add("--redis-url", url)
        if env.has("REDIS_TIMEOUT"):
            out.add("--redis-timeout", f"{env.duration('REDIS_TIMEOUT', 10.0):g}")
        if env.bool("REDIS_PERSECOND"):
            per_second = redis_url(env, "REDIS_PERSECOND")
            if per_second is None:
                raise UpstreamEnvError("REDIS_PERSECOND=true needs REDIS_PERSECOND_URL")
            out.add("--redis-persecond-url", per_second)
    else:
        out.notes.append("REDIS_URL is not set: counters are kept in memory (one replica only)")
    out.add("--expiration-jitter-max-seconds", str(env.int("EXPIRATION_JITTER_MAX_SECONDS", 300)))
    if env.int("LOCAL_CACHE_SIZE_IN_BYTES", 0) == 0:
        out.add("--local-cache-size", "0")
    out.add("--near-limit-ratio", env.str("NEAR_LIMIT_RATIO", "0.8"))
    if env.str("CACHE_KEY_PREFIX"):
        out.add("--prefix", env.str("CACHE_KEY_PREFIX"))
    if env.bool("STOP_CACHE_KEY_INCREMENT_WHEN_OVERLIMIT"):
        out.add("--stop-counting-over-limit")
    if env.bool("LIMIT_RESPONSE_HEADERS_ENABLED"):
        out.add("--response-headers")
    if env.bool("SHADOW_MODE"):
        out.add("--shadow-mode")

    for name, why in NOT_APPLIED.items():
        if env.has(name):
            out.notes.append(f"{name} is not applied: {why}")
    if not env.bool("RUNTIME_IGNOREDOTFILES") and config_type == "FILE":
        out.notes.append("RUNTIME_IGNOREDOTFILES=false is not applied: dot files are never read")
    return out


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """``/bin/ratelimit [outrider ratelimit flags...]``."""
    import os

    from services.common.cli import main as cli_main

    given = list(sys.argv[1:] if argv is None else argv)
    environ = os.environ if environ is None else environ
    try:
        translation = translate(environ)
    except UpstreamEnvError as exc:
        print(f"outrider ratelimit: envoyproxy/ratelimit environment: {exc}", file=sys.stderr)
        return 2
    for note in translation.notes:
        print(f"outrider ratelimit: envoyproxy/ratelimit environment: {note}", file=sys.stderr)
    return cli_main(["ratelimit", *translation.argv(given, environ), *given])


if __name__ == "__main__":
    sys.exit(main())
