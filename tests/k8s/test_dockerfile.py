"""Static checks of the Dockerfile (no Docker engine here: the image is not built in tests).

What is checked: the stages, that the final stage runs as uid 65532 with the `outrider`
entrypoint, that it installs nothing and copies only from the build stage, that every file
the build copies exists and is not excluded by .dockerignore, and that the manifests use
the image the Dockerfile documents.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
from dataclasses import dataclass, field

import pytest

from .checks import REPO

DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
BUILD_TOOLS = ("build-essential", "gcc", "g++", "make", "cc ", "clang", "-dev ", "apt-get install")


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """(global ARG defaults, stages) from Dockerfile text: continuation lines joined,
    comments dropped, instructions upper-cased."""
    lines: list[str] = []
    current = ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        lines.append(current + stripped)
        current = ""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in lines:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            parts = rest.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(parts[0], name))
        elif not stages:
            if keyword != "ARG":
                raise AssertionError(f"{keyword} before the first FROM")
            key, _, default = rest.partition("=")
            args[key.strip()] = default.strip()
        else:
            stages[-1].instructions.append((keyword, rest.strip()))
    return args, stages


@pytest.fixture(scope="module")
def dockerfile() -> tuple[dict[str, str], list[Stage]]:
    return parse_dockerfile(DOCKERFILE.read_text())


def test_multi_stage_on_a_slim_python_311_or_later(
    dockerfile: tuple[dict[str, str], list[Stage]],
) -> None:
    args, stages = dockerfile
    assert len(stages) >= 2, "build and runtime stages"
    for stage in stages:
        base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], stage.base)
        match = re.fullmatch(r"python:(3\.(\d+))-slim(-\w+)?", base)
        assert match, f"{stage.base} → {base}: expected python:3.X-slim"
        assert int(match.group(2)) >= 11


def test_final_stage_runs_outrider_as_65532(dockerfile: tuple[dict[str, str], list[Stage]]) -> None:
    final = dockerfile[1][-1]
    users = [v for k, v in final.instructions if k == "USER"]
    assert users, "no USER in the final stage"
    assert users[-1].split(":")[0] == "65532"
    assert users[-1].split(":")[1:] in ([], ["65532"])
    (entrypoint,) = [v for k, v in final.instructions if k == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["outrider"], 'exec-form ENTRYPOINT ["outrider"]'
    # Nothing after USER may need root.
    after_user = final.instructions[[k for k, _ in final.instructions].index("USER") :]
    assert not [v for k, v in after_user if k == "RUN"]


def test_no_build_tools_in_the_final_stage(dockerfile: tuple[dict[str, str], list[Stage]]) -> None:
    stages = dockerfile[1]
    final = stages[-1]
    build_names = {s.name for s in stages[:-1]}
    for keyword, value in final.instructions:
        if keyword == "RUN":
            padded = f" {value} "
            assert not any(tool in padded for tool in BUILD_TOOLS), f"final stage RUN {value!r}"
        if keyword == "COPY":
            flags = [w for w in shlex.split(value) if w.startswith("--from=")]
            assert flags, f"final stage copies from the build context: COPY {value}"
            assert flags[0].removeprefix("--from=") in build_names
    assert any(
        "build-essential" in v for s in stages[:-1] for k, v in s.instructions if k == "RUN"
    ), "compilers belong to the build stage"


def dockerignore_patterns() -> list[str]:
    return [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]


def ignored(path: str, patterns: list[str]) -> bool:
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!").rstrip("/")
        candidates = [pat, pat.removeprefix("**/")]
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, c) for p in prefixes for c in candidates) or any(
            fnmatch.fnmatch(part, pat.removeprefix("**/"))
            for part in parts
            if pat.startswith("**/")
        ):
            result = not negate
    return result


def test_build_context_files_exist_and_are_not_ignored(
    dockerfile: tuple[dict[str, str], list[Stage]],
) -> None:
    patterns = dockerignore_patterns()
    for must_skip in (".venv", ".git", "loadtests/results"):
        assert ignored(must_skip, patterns), f".dockerignore must exclude {must_skip}"
    for stage in dockerfile[1]:
        for keyword, value in stage.instructions:
            if keyword != "COPY" or "--from=" in value:
                continue
            *sources, _dest = shlex.split(value)
            for source in sources:
                assert (REPO / source).exists(), f"COPY {source}: not in the repository"
                assert not ignored(source, patterns), f"COPY {source}: excluded by .dockerignore"


def test_manifests_use_the_documented_image_tags() -> None:
    documented = set(re.findall(r"docker build -t (\S+)", DOCKERFILE.read_text()))
    used = set()
    for path in (REPO / "k8s").rglob("*.yaml"):
        used |= set(re.findall(r"image: (outrider:\S+)", path.read_text()))
    assert used, "no manifest uses the Outrider image"
    assert used <= documented, f"{used - documented} is not built by the Dockerfile's commands"


def test_bin_ratelimit_is_the_envoyproxy_environment_entry_point(
    dockerfile: tuple[dict[str, str], list[Stage]],
) -> None:
    """Envoy Gateway starts its rate limit container with the command /bin/ratelimit."""
    import tomllib

    final = dockerfile[1][-1]
    links = [
        shlex.split(part)
        for k, v in final.instructions
        if k == "RUN"
        for part in v.split("&&")
        if part.strip().startswith("ln -s")
    ]
    targets = {words[-1]: words[-2] for words in links}
    assert "/bin/ratelimit" in targets, "the final stage links /bin/ratelimit"
    script = targets["/bin/ratelimit"].removeprefix("/opt/outrider/bin/")
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts[script] == "services.ratelimit.upstream_env:main"
