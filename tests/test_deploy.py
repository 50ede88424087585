"""deploy/: the production instance on a real PostgreSQL, the Docker, Helm and ECS files checked
by their own tools, and each deployment's instance built by dagster-docker, dagster-k8s and
dagster-aws (a dummy kubeconfig, moto's ECS). Nothing here leaves loopback."""

import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import psycopg2
import pytest
import yaml
from moto.server import ThreadedMotoServer

from tests.pgcluster import PostgresCluster
from tests.s3server import CREDENTIALS, ISOLATION

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path=str(BIN))
    assert path, f"{name} is not installed (pip install -e '.[test]')"
    return path


def _yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def pg_env(postgres: PostgresCluster, db: str) -> dict[str, str]:
    """The instance's Postgres variables for database `db` of the test cluster."""
    return {
        "DAGSTER_POSTGRES_HOST": postgres.host,
        "DAGSTER_POSTGRES_PORT": str(postgres.port),
        "DAGSTER_POSTGRES_USER": postgres.user,
        "DAGSTER_POSTGRES_PASSWORD": postgres.password,
        "DAGSTER_POSTGRES_DB": db,
    }


def fresh_db(postgres: PostgresCluster) -> str:
    name = f"dagster_{uuid.uuid4().hex[:10]}"
    postgres.create_database(name)
    return name


def instance_home(tmp_path: Path, config: dict | Path) -> Path:
    home = tmp_path / "dagster_home"
    home.mkdir()
    if isinstance(config, Path):
        shutil.copy(config, home / "dagster.yaml")
    else:
        (home / "dagster.yaml").write_text(yaml.safe_dump(config))
    return home


@pytest.fixture
def aws_env(monkeypatch) -> None:
    """Test credentials only, from the environment; no config files, no instance metadata."""
    for key, value in {**ISOLATION, **CREDENTIALS}.items():
        monkeypatch.setenv(key, value)


# --- the production instance on PostgreSQL -------------------------------------------------


def test_dagster_instance_migrate_on_postgres(postgres, tmp_path, aws_env):
    """`dagster instance migrate` with deploy/dagster.yaml creates every storage's schema."""
    db = fresh_db(postgres)
    home = instance_home(tmp_path, DEPLOY / "dagster.yaml")
    env = {
        **os.environ,
        **pg_env(postgres, db),
        "DAGSTER_HOME": str(home),
        "DAGSTER_COMPUTE_LOGS_BUCKET": "compute-logs",
    }
    done = subprocess.run(
        [_tool("dagster"), "instance", "migrate"], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    with psycopg2.connect(postgres.url(db)) as conn, conn.cursor() as cur:
        cur.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
        tables = {row[0] for row in cur.fetchall()}
    # Run storage, event log (with the pools' slot tables), schedule storage, and their migrations.
    assert {"runs", "event_logs", "concurrency_slots", "jobs", "job_ticks"} <= tables, tables
    assert {"alembic_version", "secondary_indexes"} <= tables


def test_production_instance_settings(postgres, tmp_path, aws_env, monkeypatch):
    for key, value in pg_env(postgres, fresh_db(postgres)).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("DAGSTER_COMPUTE_LOGS_BUCKET", "compute-logs")
    home = instance_home(tmp_path, DEPLOY / "dagster.yaml")
    instance = dg.DagsterInstance.from_config(str(home))
    try:
        names = {
            type(instance.run_storage).__name__,
            type(instance.event_log_storage).__name__,
            type(instance.schedule_storage).__name__,
            type(instance.run_coordinator).__name__,
            type(instance.compute_log_manager).__name__,
        }
        assert names == {
            "PostgresRunStorage",
            "PostgresEventLogStorage",
            "PostgresScheduleStorage",
            "QueuedRunCoordinator",
            "S3ComputeLogManager",
        }
        assert instance.compute_log_manager._s3_bucket == "compute-logs"
        config = instance.get_concurrency_config()
        assert config.pool_config.default_pool_limit == 1  # duckdb_writers: one writer
        assert config.run_queue_config.max_concurrent_runs == 4
        assert instance.run_monitoring_enabled
    finally:
        instance.dispose()


def test_instance_settings_come_from_the_environment_only():
    """Every Postgres setting of every instance file is an `env:` reference."""
    for path in (
        DEPLOY / "dagster.yaml",
        DEPLOY / "docker/dagster.yaml",
        DEPLOY / "ecs/dagster.yaml",
    ):
        db = _yaml(path)["storage"]["postgres"]["postgres_db"]
        for key in ("hostname", "port", "username", "password", "db_name"):
            assert set(db[key]) == {"env"}, (path, key)


def test_deployment_instances_differ_from_the_production_one_only_by_run_launcher():
    base = _yaml(DEPLOY / "dagster.yaml")
    assert "run_launcher" not in base  # the default: runs in the code server's process
    for path in (DEPLOY / "docker/dagster.yaml", DEPLOY / "ecs/dagster.yaml"):
        variant = _yaml(path)
        launcher = variant.pop("run_launcher")
        assert variant == base, path
        assert launcher["config"], path


def test_no_credentials_in_deploy_files():
    """No key, password or secret value is written in deploy/: only references to them."""
    texts = {p: p.read_text() for p in DEPLOY.rglob("*") if p.is_file()}
    for path, text in texts.items():
        assert not re.search(r"AKIA[0-9A-Z]{16}", text), path
        for match in re.finditer(
            r"^[ \t]*-?[ \t]*[\w-]*(PASSWORD|SECRET|password|secret)[\w-]*[ \t]*[:=][ \t]*(\S.*)$",
            text,
            re.MULTILINE,
        ):
            value = match.group(2)
            # Allowed: an env reference, a compose interpolation, a name, or nothing.
            assert (
                value.startswith(("${", "$(", "{", "#"))
                or value.strip('"') == ""
                or re.fullmatch(r'"?[a-z][a-z0-9-]*"?', value)  # a secret's name or key
            ), f"{path}: {match.group(0).strip()}"


# --- Docker ----------------------------------------------------------------------------------


def test_dockerfile_passes_hadolint():
    dockerfile = DEPLOY / "docker/Dockerfile"
    done = subprocess.run([_tool("hadolint"), str(dockerfile)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    text = dockerfile.read_text()
    makefile_torch = re.search(r"^TORCH := (torch==\S+)$", (REPO / "Makefile").read_text(), re.M)
    assert makefile_torch and f" {makefile_torch.group(1)}" in text  # pinned as in the Makefile
    assert "whl/cpu" in text  # the CPU build by default
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert re.search(r"^RUN python .*prepare_manifest", text, re.M)  # parsed into the image
    cmd = json.loads(re.search(r"^CMD (.+)$", text, re.M).group(1))
    assert cmd[:3] == ["dagster", "api", "grpc"] and cmd[-4:] == [
        "-m",
        "tc_assets.defs.definitions",
        "-a",
        "defs",
    ]


def test_compose_file_is_valid_and_wires_the_services():
    compose_path = DEPLOY / "docker/docker-compose.yml"
    done = subprocess.run(
        [_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(compose_path)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    compose = _yaml(compose_path)
    services = compose["services"]
    assert set(services) == {"postgres", "code", "webserver", "daemon"}
    assert services["postgres"]["healthcheck"]["test"]
    for name in ("webserver", "daemon"):
        assert services[name]["depends_on"]["postgres"]["condition"] == "service_healthy"
        assert "/var/run/docker.sock:/var/run/docker.sock" in services[name]["volumes"]
    assert services["webserver"]["command"][0] == "dagster-webserver"
    assert services["daemon"]["command"][:2] == ["dagster-daemon", "run"]
    env = services["code"]["environment"]
    for key in ("TC_SOURCE", "TC_STORAGE", "TC_WAREHOUSE", "DAGSTER_POSTGRES_PASSWORD"):
        assert str(env[key]).startswith("${"), key  # from the environment
    assert env["DAGSTER_POSTGRES_HOST"] == "postgres"
    # The workspace points at the code service on the port of the image's command.
    (entry,) = _yaml(DEPLOY / "docker/workspace.yaml")["load_from"]
    assert entry["grpc_server"]["host"] == "code"
    cmd = (DEPLOY / "docker/Dockerfile").read_text()
    assert f'"-p", "{entry["grpc_server"]["port"]}"' in cmd
    # The launcher passes every variable it lists, and each is set on the compose services.
    launcher = _yaml(DEPLOY / "docker/dagster.yaml")["run_launcher"]
    assert launcher["class"] == "DockerRunLauncher"
    assert set(launcher["config"]["env_vars"]) <= set(env)
    assert launcher["config"]["network"] in compose["networks"]
    volume = launcher["config"]["container_kwargs"]["volumes"][0].split(":")[0]
    assert compose["volumes"][volume]["name"] == volume
    assert env["TC_WAREHOUSE"].split(":-")[1].rstrip("}").startswith("/var/lib/tc-platform/")


def test_docker_instance_builds_its_run_launcher(postgres, tmp_path, aws_env, monkeypatch):
    env = {
        **pg_env(postgres, fresh_db(postgres)),
        "DAGSTER_COMPUTE_LOGS_BUCKET": "compute-logs",
        "TC_SOURCE": "s3://tournament/live",
        "TC_WAREHOUSE": "/var/lib/tc-platform/warehouse.duckdb",
        "TC_STORAGE": "s3://tournament/values",
        "TC_S3_ENDPOINT_URL": "",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    instance = dg.DagsterInstance.from_config(
        str(instance_home(tmp_path, DEPLOY / "docker/dagster.yaml"))
    )
    try:
        launcher = instance.run_launcher
        assert type(launcher).__name__ == "DockerRunLauncher"
        assert launcher.networks == ["tc_platform"]
        assert launcher.container_kwargs["volumes"] == ["tc_warehouse:/var/lib/tc-platform"]
        assert "TC_STORAGE" in launcher.env_vars
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
    finally:
        instance.dispose()


# --- Kubernetes (the dagster/dagster chart) ------------------------------------------------

HELM = DEPLOY / "helm/values.yaml"


def test_helm_values_set_what_the_chart_reads():
    values = _yaml(HELM)
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    assert values["dagster-user-deployments"]["enabled"] is True
    args = deployment["dagsterApiGrpcArgs"]
    assert args[args.index("-m") + 1] == "tc_assets.defs.definitions"
    assert args[args.index("-a") + 1] == "defs"
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    k8s = values["runLauncher"]["config"]["k8sRunLauncher"]
    assert k8s["runK8sConfig"]["containerConfig"]["resources"]["requests"]["memory"]
    # Run pods get the code deployment's settings and the warehouse volume.
    assert deployment["includeConfigInLaunchedRuns"]["enabled"] is True
    env = {e["name"]: e["value"] for e in deployment["env"]}
    assert env["TC_STORAGE"].startswith("s3://") and env["TC_SOURCE"].startswith("s3://")
    (mount,) = deployment["volumeMounts"]
    assert env["TC_WAREHOUSE"].startswith(mount["mountPath"] + "/")
    daemon = values["dagsterDaemon"]["runCoordinator"]
    assert daemon["enabled"] and daemon["type"] == "QueuedRunCoordinator"
    assert values["concurrency"]["enabled"] is True
    assert values["concurrency"]["pools"]["defaultLimit"] == 1
    assert values["concurrency"]["runs"]["maxConcurrentRuns"] >= 1
    # The external Postgres, its password through a secret the chart does not create.
    assert values["postgresql"]["enabled"] is False
    assert values["postgresql"]["postgresqlHost"]
    assert "postgresqlPassword" not in values["postgresql"]
    assert values["global"]["postgresqlSecretName"]
    assert values["generatePostgresqlPasswordSecret"] is False
    assert values["computeLogManager"]["type"] == "S3ComputeLogManager"


def chart_instance(values: dict, kubeconfig: Path) -> dict:
    """The instance the chart renders from `values` (helm/dagster/templates/helpers/instance:
    _postgresql.tpl, _run-launcher.tpl, _run-coordinator.tpl, _concurrency.tpl,
    _compute-log-manager.tpl), outside a cluster: a kubeconfig file instead of in-cluster."""
    pg = values["postgresql"]
    postgres_db = {
        "username": pg["postgresqlUsername"],
        "password": {"env": "DAGSTER_PG_PASSWORD"},  # the chart's env from the secret
        "hostname": pg["postgresqlHost"],
        "db_name": pg["postgresqlDatabase"],
        "port": pg["service"]["port"],
        "params": pg.get("postgresqlParams", {}),
        "scheme": pg["postgresqlScheme"],
    }
    k8s = values["runLauncher"]["config"]["k8sRunLauncher"]
    s3_logs = values["computeLogManager"]["config"]["s3ComputeLogManager"]
    pools = values["concurrency"]["pools"]
    return {
        "run_storage": {
            "module": "dagster_postgres.run_storage",
            "class": "PostgresRunStorage",
            "config": {"postgres_db": postgres_db},
        },
        "event_log_storage": {
            "module": "dagster_postgres.event_log",
            "class": "PostgresEventLogStorage",
            "config": {"postgres_db": postgres_db},
        },
        "schedule_storage": {
            "module": "dagster_postgres.schedule_storage",
            "class": "PostgresScheduleStorage",
            "config": {"postgres_db": postgres_db},
        },
        "run_coordinator": {
            "module": "dagster.core.run_coordinator",
            "class": values["dagsterDaemon"]["runCoordinator"]["type"],
        },
        "concurrency": {
            "pools": {
                "default_limit": pools["defaultLimit"],
                "granularity": pools["granularity"],
                "op_granularity_run_buffer": pools["opGranularityRunBuffer"],
            },
            "runs": {"max_concurrent_runs": values["concurrency"]["runs"]["maxConcurrentRuns"]},
        },
        "run_launcher": {
            "module": "dagster_k8s",
            "class": values["runLauncher"]["type"],
            "config": {
                "load_incluster_config": False,
                "kubeconfig_file": str(kubeconfig),
                "job_namespace": "dagster",
                "image_pull_policy": k8s["imagePullPolicy"],
                "service_account_name": values["global"]["serviceAccountName"],
                "instance_config_map": "dagster-instance",
                "postgres_password_secret": values["global"]["postgresqlSecretName"],
                "env_secrets": [s["name"] for s in k8s.get("envSecrets", [])],
                "run_k8s_config": {
                    "container_config": k8s["runK8sConfig"]["containerConfig"],
                    "job_spec_config": k8s["runK8sConfig"]["jobSpecConfig"],
                },
            },
        },
        "compute_logs": {
            "module": "dagster_aws.s3.compute_log_manager",
            "class": values["computeLogManager"]["type"],
            "config": {
                "bucket": s3_logs["bucket"],
                "prefix": s3_logs["prefix"],
                "skip_empty_files": s3_logs["skipEmptyFiles"],
                "upload_interval": s3_logs["uploadInterval"],
            },
        },
    }


DUMMY_KUBECONFIG = """apiVersion: v1
kind: Config
clusters:
- name: test
  cluster: {server: "https://127.0.0.1:6443", insecure-skip-tls-verify: true}
users:
- name: test
  user: {token: not-a-real-token}
contexts:
- name: test
  context: {cluster: test, user: test, namespace: dagster}
current-context: test
"""


def test_k8s_instance_builds_from_the_helm_values(postgres, tmp_path, aws_env, monkeypatch):
    values = _yaml(HELM)
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(DUMMY_KUBECONFIG)
    db = fresh_db(postgres)
    values["postgresql"].update(
        postgresqlHost=postgres.host,
        postgresqlUsername=postgres.user,
        postgresqlDatabase=db,
        postgresqlParams={},  # the test cluster has no TLS
        service={"port": postgres.port},
    )
    monkeypatch.setenv("DAGSTER_PG_PASSWORD", postgres.password)
    home = instance_home(tmp_path, chart_instance(values, kubeconfig))
    instance = dg.DagsterInstance.from_config(str(home))
    try:
        launcher = instance.run_launcher
        assert type(launcher).__name__ == "K8sRunLauncher"
        assert launcher.job_namespace == "dagster"
        resources = launcher.run_k8s_config["container_config"]["resources"]
        assert resources["limits"]["memory"] == "8Gi"
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        assert instance.get_concurrency_config().pool_config.default_pool_limit == 1
    finally:
        instance.dispose()


def test_gpu_run_tags_request_a_gpu_node():
    from dagster_k8s.job import get_user_defined_k8s_config

    tags = _yaml(DEPLOY / "helm/gpu-run-tags.yaml")
    assert all(isinstance(v, str) for v in tags.values())  # run tags are strings
    config = get_user_defined_k8s_config(tags)  # validates the tag against dagster-k8s's schema
    assert config.container_config["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert config.pod_spec_config["node_selector"] == {"nvidia.com/gpu.present": "true"}
    assert config.pod_spec_config["tolerations"][0]["key"] == "nvidia.com/gpu"


# --- ECS -------------------------------------------------------------------------------------


@pytest.fixture
def moto_aws(aws_env, monkeypatch) -> Iterator[str]:
    """moto's server (every AWS service) on loopback; every boto3 client of the test uses it."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    try:
        yield endpoint
    finally:
        server.stop()


def test_ecs_instance_builds_its_run_launcher(postgres, tmp_path, moto_aws, monkeypatch):
    import boto3

    ecs = boto3.client("ecs")
    ecs.create_cluster(clusterName="tc-platform")
    task = ecs.register_task_definition(
        family="tc-platform-run",
        containerDefinitions=[{"name": "run", "image": "tc-platform:test", "memory": 8192}],
        requiresCompatibilities=["FARGATE"],
        networkMode="awsvpc",
        cpu="4096",
        memory="8192",
    )["taskDefinition"]
    secret = boto3.client("secretsmanager").create_secret(
        Name="tc-platform/postgres", SecretString="not-a-real-password"
    )
    env = {
        **pg_env(postgres, fresh_db(postgres)),
        "DAGSTER_COMPUTE_LOGS_BUCKET": "compute-logs",
        "DAGSTER_ECS_RUN_TASK_DEFINITION": "tc-platform-run",
        "DAGSTER_POSTGRES_PASSWORD_SECRET_ARN": secret["ARN"],
        "TC_SOURCE": "s3://tournament/live",
        "TC_WAREHOUSE": "/var/lib/tc-platform/warehouse.duckdb",
        "TC_STORAGE": "s3://tournament/values",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    instance = dg.DagsterInstance.from_config(
        str(instance_home(tmp_path, DEPLOY / "ecs/dagster.yaml"))
    )
    try:
        launcher = instance.run_launcher
        assert type(launcher).__name__ == "EcsRunLauncher"
        # The task definition was looked up in ECS (its container `run` checked) by family.
        assert launcher.task_definition == task["taskDefinitionArn"]
        assert launcher.container_name == "run"
        assert launcher.secrets == [
            {"name": "DAGSTER_POSTGRES_PASSWORD", "valueFrom": secret["ARN"]}
        ]
        assert launcher.secrets_tags == ["dagster"]
        assert launcher.use_current_ecs_task_config
        assert launcher.run_resources == {"cpu": "4096", "memory": "8192"}
        assert "DAGSTER_POSTGRES_PASSWORD" not in launcher.env_vars  # only as a secret
        assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
    finally:
        instance.dispose()
