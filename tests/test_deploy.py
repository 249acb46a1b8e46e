"""Deployment files: docker-compose.yml resolves, and the Dockerfile names things that exist.

No Docker engine is needed: `docker-compose config` only parses and validates.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PORT = 8000


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines = [ln for ln in (ROOT / "Dockerfile").read_text().splitlines()
             if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    pairs = [ln.split(None, 1) for ln in joined.splitlines() if ln.strip()]
    return [(inst.upper(), args.strip()) for inst, args in pairs]


def instructions(name: str) -> list[str]:
    return [args for inst, args in dockerfile() if inst == name]


def dockerignored(path: str) -> bool:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    patterns = [p.strip().removeprefix("**/") for p in lines if p.strip() and not p.startswith("#")]
    parts = Path(path).parts
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(fnmatch.fnmatch(p, pat) or fnmatch.fnmatch(Path(p).name, pat)
               for p in prefixes for pat in patterns)


def compose(*profiles: str) -> dict:
    """The services docker-compose.yml resolves to with `profiles`."""
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.skip("docker-compose is not installed (scripts/setup.sh installs it with apt-get)")
    flags = [arg for p in profiles for arg in ("--profile", p)]
    done = subprocess.run([exe, "-f", "docker-compose.yml", *flags, "config"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout)["services"]


@pytest.fixture(scope="module")
def anchor() -> dict:
    return compose()["anchor"]


def test_the_default_profile_is_one_anchor():
    # docker-compose 1.x lists every service in `config`; `up` starts those of no profile
    services = compose()
    assert [name for name, s in services.items() if not s.get("profiles")] == ["anchor"]
    assert all(s.get("profiles") == ["scaled"] for name, s in services.items() if name != "anchor")


def test_the_scaled_profile_wires_two_anchors_redis_and_the_tested_proxy_config():
    services = compose("scaled")
    proxy = services["proxy"]
    (mount,) = proxy["volumes"]
    source = mount.split(":")[0] if isinstance(mount, str) else mount["source"]
    assert Path(source).resolve() == ROOT / "scripts" / "haproxy.cfg"  # the file tests/test_failover.py runs
    needed = set(re.findall(r"\$\{(\w+)\}", (ROOT / "scripts" / "haproxy.cfg").read_text()))
    assert needed == set(proxy["environment"])
    for name in ("a", "b"):
        env = services[f"anchor-{name}"]["environment"]
        assert proxy["environment"][f"HPI_ANCHOR_{name.upper()}"] == f"anchor-{name}:{PORT}"
        assert env["HPI_SESSION_STORE"] == "redis" and env["HPI_REDIS_URL"].startswith("redis://redis:")
        assert "ports" not in services[f"anchor-{name}"]  # reached through the proxy only
    assert "--appendfsync" in services["redis"]["command"]


def test_compose_builds_this_repo(anchor):
    assert Path(anchor["build"]["context"]) == ROOT
    assert anchor["build"].get("dockerfile", "Dockerfile") == "Dockerfile"


def test_compose_publishes_on_loopback_only(anchor):
    # `config` prints "127.0.0.1:8000:8000/tcp" (v1) or a mapping (v2); accept both spellings.
    ports = [p if isinstance(p, str)
             else f"{p['host_ip']}:{p['published']}:{p['target']}/{p['protocol']}"
             for p in anchor["ports"]]
    assert ports == [f"127.0.0.1:{PORT}:{PORT}/tcp"]


def test_compose_environment_and_data_volume(anchor):
    assert anchor["environment"]["HPI_MODEL"] == "default"
    assert anchor["environment"]["HPI_DATA_DIR"] == "/data"
    targets = [v.split(":")[1] if isinstance(v, str) else v["target"] for v in anchor["volumes"]]
    assert targets == ["/data"]


def test_compose_healthcheck_probes_healthz(anchor):
    test = anchor["healthcheck"]["test"]
    assert test[:3] == ["CMD", "python", "-c"]
    assert f"http://127.0.0.1:{PORT}/healthz" in test[3]
    compile(test[3], "healthcheck", "exec")


def test_dockerfile_installs_with_the_tested_install_script():
    """The image installs with scripts/install.sh, which tests/test_package.py runs into a fresh
    virtualenv and serves from (no Docker engine here to build the image itself)."""
    assert instructions("FROM") == ["python:3.11-slim"]
    runs = instructions("RUN")
    assert any(re.search(r"\bbash /src/scripts/install\.sh\b", r) for r in runs), runs
    assert "pip install torch==2.13.0" in " && ".join(runs)


def test_dockerfile_copies_files_that_exist_and_are_not_ignored():
    copies = instructions("COPY")
    assert copies
    for args in copies:
        *sources, _ = args.split()
        for src in sources:
            assert (ROOT / src).exists(), src
    for needed in ("pyproject.toml", "scripts/install.sh", "server/cli.py", "protocol/holo.py",
                   "client_web/index.html", "shaders/gemv.wgsl"):
        assert not dockerignored(needed), needed
    assert dockerignored(".venv/bin/python") and dockerignored(".git/HEAD")


def test_dockerfile_runs_hpi_serve_on_the_exposed_port():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["hpi"] == "hpi.cli:main"
    (cmd,) = instructions("CMD")
    argv = json.loads(cmd)  # exec form, so signals reach the server directly
    assert argv[:2] == ["hpi", "serve"]
    assert argv[argv.index("--host") + 1] == "0.0.0.0"
    assert argv[argv.index("--port") + 1] == str(PORT)
    assert instructions("EXPOSE") == [str(PORT)]
