"""What a job's stages share in the namespace: the data volume and an MLflow tracking server.

The MLflow server runs ``mlflow server --app-name basic-auth`` on a PostgreSQL store (a
StatefulSet with its own volume), serves artifacts from its volume or an object store
(``--artifacts-destination``), and keeps its user table (SQLite) on its volume. Every credential
comes from a Secret by reference: the PostgreSQL user and password, the admin user and password,
the Flask session key. The database URI is composed by Kubernetes from those variables
(``$(VAR)`` expansion), so no password is ever written into a manifest.
"""

from __future__ import annotations

from typing import Any

from omnidiff.k8s import pod
from omnidiff.k8s.config import MLFLOW_PORT, ClusterConfig, MlflowServerSpec
from omnidiff.k8s.workloads import metadata

POSTGRES_PORT = 5432
POSTGRES_UID = 999  # the postgres image's own user
AUTH_MOUNT = "/etc/mlflow-auth"
STORE_MOUNT = "/mlflow"


def services(job: str, cluster: ClusterConfig) -> list[dict[str, Any]]:
    """The data claim (when the job creates it) and the MLflow server (when it runs one)."""
    out = []
    if cluster.storage.create:
        storage = cluster.storage
        out.append(claim(storage.claim, job, "data", cluster.namespace, storage.size,
                         storage.access_mode, storage.storage_class))
    if cluster.mlflow is not None and cluster.mlflow.server is not None:
        out += mlflow_server(job, cluster, cluster.mlflow.server)
    return out


def claim(name: str, job: str, component: str, namespace: str, size: str, access_mode: str,
          storage_class: str | None) -> dict[str, Any]:
    spec: dict[str, Any] = {"accessModes": [access_mode],
                            "resources": {"requests": {"storage": size}}}
    if storage_class:
        spec["storageClassName"] = storage_class
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": metadata(name, pod.labels(job, component=component), namespace),
            "spec": spec}


def mlflow_server(job: str, cluster: ClusterConfig, server: MlflowServerSpec
                  ) -> list[dict[str, Any]]:
    ns, name = cluster.namespace, server.name
    db = f"{name}-postgres"
    labels = pod.labels(job, component="mlflow")
    auth_ini = ("[mlflow]\n"
                "default_permission = READ\n"
                f"database_uri = sqlite:///{STORE_MOUNT}/basic_auth.db\n"
                "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    hosts = [f"{host}{port}" for host in (name, f"{name}.{ns}", f"{name}.{ns}.svc",
                                          f"{name}.{ns}.svc.cluster.local")
             for port in ("", ":*")]
    args = ["server", "--app-name", "basic-auth", "--host", "0.0.0.0",
            "--port", str(MLFLOW_PORT), "--backend-store-uri", "$(MLFLOW_BACKEND_STORE_URI)",
            "--serve-artifacts", "--artifacts-destination",
            server.artifacts_destination or f"{STORE_MOUNT}/artifacts",
            "--allowed-hosts", ",".join([*hosts, "localhost:*", *server.allowed_hosts])]
    secret = server.postgres.secret
    env = [pod.secret_env("POSTGRES_USER", secret, "username"),
           pod.secret_env("POSTGRES_PASSWORD", secret, "password"),
           {"name": "MLFLOW_BACKEND_STORE_URI",
            "value": f"postgresql://$(POSTGRES_USER):$(POSTGRES_PASSWORD)@{db}:{POSTGRES_PORT}"
                     "/mlflow"},
           {"name": "MLFLOW_AUTH_CONFIG_PATH", "value": f"{AUTH_MOUNT}/basic_auth.ini"},
           pod.secret_env("MLFLOW_AUTH_ADMIN_USERNAME", server.admin_secret, "username"),
           pod.secret_env("MLFLOW_AUTH_ADMIN_PASSWORD", server.admin_secret, "password"),
           pod.secret_env("MLFLOW_FLASK_SERVER_SECRET_KEY", server.admin_secret,
                          "flask-secret-key")]
    container = {
        "args": args, "command": ["mlflow"], "env": env, "image": server.image or cluster.image,
        "name": "mlflow", "ports": [{"containerPort": MLFLOW_PORT, "name": "http"}],
        "readinessProbe": {"httpGet": {"path": "/health", "port": "http"},
                           "periodSeconds": 10},
        "securityContext": pod.container_security(),
        "volumeMounts": [{"mountPath": STORE_MOUNT, "name": "store"},
                         {"mountPath": AUTH_MOUNT, "name": "auth", "readOnly": True}]}
    pod_spec = {"containers": [container],
                "securityContext": pod.pod_security(cluster.run_as_user),
                "volumes": [{"name": "store", "persistentVolumeClaim": {"claimName": name}},
                            {"configMap": {"name": f"{name}-auth"}, "name": "auth"}]}
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment",
                  "metadata": metadata(name, labels, ns),
                  "spec": {"replicas": 1, "selector": {"matchLabels": _select(labels, name)},
                           "strategy": {"type": "Recreate"},  # one writer of its volume
                           "template": {"metadata": {"labels": _select(labels, name)},
                                        "spec": pod_spec}}}
    auth = {"apiVersion": "v1", "data": {"basic_auth.ini": auth_ini}, "kind": "ConfigMap",
            "metadata": metadata(f"{name}-auth", labels, ns)}
    return [claim(name, job, "mlflow", ns, server.storage_size, "ReadWriteOnce",
                  server.storage_class),
            auth, *postgres(job, cluster, server, db), deployment,
            service(name, labels, ns, MLFLOW_PORT, "http")]


def postgres(job: str, cluster: ClusterConfig, server: MlflowServerSpec, name: str
             ) -> list[dict[str, Any]]:
    """PostgreSQL as a one-replica StatefulSet with its own volume, and its Service."""
    labels = pod.labels(job, component="mlflow-postgres")
    secret = server.postgres.secret
    container = {
        "env": [pod.secret_env("POSTGRES_USER", secret, "username"),
                pod.secret_env("POSTGRES_PASSWORD", secret, "password"),
                {"name": "POSTGRES_DB", "value": "mlflow"},
                {"name": "PGDATA", "value": "/var/lib/postgresql/data/pgdata"}],
        "image": server.postgres.image, "name": "postgres",
        "ports": [{"containerPort": POSTGRES_PORT, "name": "postgres"}],
        "readinessProbe": {"exec": {"command": ["pg_isready", "-h", "127.0.0.1"]},
                           "periodSeconds": 10},
        "securityContext": pod.container_security(),
        "volumeMounts": [{"mountPath": "/var/lib/postgresql/data", "name": "data"},
                         {"mountPath": "/var/run/postgresql", "name": "run"}]}
    volume_claim = {"metadata": {"labels": labels, "name": "data"},
                    "spec": {"accessModes": ["ReadWriteOnce"],
                             "resources": {"requests": {"storage": server.postgres.storage_size}}}}
    if server.storage_class:
        volume_claim["spec"]["storageClassName"] = server.storage_class
    statefulset = {
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": metadata(name, labels, cluster.namespace),
        "spec": {"replicas": 1, "selector": {"matchLabels": _select(labels, name)},
                 "serviceName": name,
                 "template": {"metadata": {"labels": _select(labels, name)},
                              "spec": {"containers": [container],
                                       "securityContext": pod.pod_security(POSTGRES_UID),
                                       "volumes": [{"emptyDir": {}, "name": "run"}]}},
                 "volumeClaimTemplates": [volume_claim]}}
    return [statefulset, service(name, labels, cluster.namespace, POSTGRES_PORT, "postgres")]


def service(name: str, labels: dict[str, str], namespace: str, port: int, port_name: str
            ) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Service", "metadata": metadata(name, labels, namespace),
            "spec": {"ports": [{"name": port_name, "port": port, "targetPort": port_name}],
                     "selector": _select(labels, name)}}


def _select(labels: dict[str, str], name: str) -> dict[str, str]:
    """The labels that pick one server's pods (component + instance)."""
    return {"app.kubernetes.io/component": labels["app.kubernetes.io/component"],
            "app.kubernetes.io/instance": name, "app.kubernetes.io/name": pod.APP}
