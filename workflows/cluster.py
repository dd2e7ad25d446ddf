"""Where a command's Ray work runs: a local Ray, the cluster in RAY_ADDRESS, or (``--cluster``) a Ray job.

- :func:`ensure_ray` — inside a command: join ``RAY_ADDRESS`` when set (a Ray job's driver always has it), else start
  a local Ray bound to 127.0.0.1.
- :func:`submit_self_as_job` — ``--cluster cluster.yaml``: send the same ``hci-atr`` command (minus ``--cluster``) to
  the cluster's head through the Jobs API, ship this project as the job's ``working_dir``, stream the job's logs until
  it ends, and return its exit status (0 = succeeded).

Head address (dashboard, port 8265 unless set) is read from the cluster-launcher YAML, in this order:

1. ``metadata.hci_atr.dashboard_address`` (``metadata`` is the launcher's free-form section; Ray ignores it): a full
   ``http://host:port`` or ``host[:port]``. Use this for cloud clusters (e.g. after ``ray get-head-ip cluster.yaml``),
   or to reach the dashboard through an SSH tunnel (``ray dashboard cluster.yaml`` -> ``127.0.0.1``).
2. ``provider.head_ip`` for ``provider.type: local``.
3. ``ray get-head-ip cluster.yaml`` (needs the cloud provider's credentials on this machine).

Token authentication (Ray 2.59+ turns it on for ``ray start --head``): when a token is available (``RAY_AUTH_TOKEN``,
``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``), the client runs with ``RAY_AUTH_MODE=token`` so the Jobs API
accepts it. Copy the head's ``~/.ray/auth_token`` to this machine (or export RAY_AUTH_TOKEN) for a remote cluster.

Paths in the command (``--data``, ``--out``) are paths on the cluster's head: use absolute paths or shared storage.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator, Sequence
from urllib.parse import urlparse

import yaml

from hci_atr.errors import HciAtrError, one_line

DASHBOARD_PORT = 8265
# Never shipped with the job: environments, data, run outputs, caches (the Jobs API caps working_dir size).
WORKING_DIR_EXCLUDES = [
    "/.git", "/.venv", "/venv", "__pycache__", "*.pyc", ".pytest_cache", "/data", "/demo_data", "/mlruns", "/mlflow.db",
    "/mlartifacts", "/hci_atr_runs", "*.parquet", "*.wav", "*.flac", "*.ogg", "*.mp4", "*.pt", "*.pth",
    "*.safetensors", "node_modules", ".ci/cache",
    # never ship secrets, whatever folder this is
    ".env", ".env.*", "*.pem", "*.key", "*.p12", "id_rsa*", "id_ed25519*", ".ssh", ".aws", ".ray", ".netrc",
    ".git-credentials", ".docker", ".kube", "*.token", "auth_token",
]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}



class ClusterError(HciAtrError):
    """The Ray cluster named by --cluster cannot be reached or refused the job."""


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect this process to Ray once: ``address`` or ``$RAY_ADDRESS`` if given, else a new local Ray.

    A local Ray binds to 127.0.0.1 (nothing is exposed on the network) and uses ``num_cpus`` (default: all cores).
    """
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    try:
        if address:
            ray.init(address=address, configure_logging=False)
        else:
            # "local": never attach to some other cluster found on this machine by `ray start`.
            ray.init(address="local", num_cpus=num_cpus, _node_ip_address="127.0.0.1", configure_logging=False)
    except ConnectionError as e:
        raise ClusterError(f"cannot connect to Ray at {address!r} ({one_line(e)}); check RAY_ADDRESS") from None


# -- cluster YAML -----------------------------------------------------------------------------------------------


def read_cluster_yaml(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ClusterError(f"{p}: cluster file not found (give the YAML that `ray up` started the cluster with)")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ClusterError(f"{p}: not valid YAML ({one_line(e)})") from None
    if not isinstance(data, dict) or not isinstance(data.get("provider"), dict):
        raise ClusterError(f"{p}: not a Ray cluster-launcher config (no 'provider' section)")
    return data


def dashboard_address(cluster_yaml: str | os.PathLike) -> str:
    """``http://host:port`` of the head's dashboard (Jobs API) named by ``cluster_yaml`` (see module docstring)."""
    cfg = read_cluster_yaml(cluster_yaml)
    extra = ((cfg.get("metadata") or {}).get("hci_atr") or {})
    addr = extra.get("dashboard_address")
    provider = cfg["provider"]
    if not addr and provider.get("type") == "local":
        addr = provider.get("head_ip")
        if not addr:
            raise ClusterError(f"{cluster_yaml}: provider.type is local but provider.head_ip is not set")
    if not addr:
        try:
            res = subprocess.run(["ray", "get-head-ip", os.fspath(cluster_yaml)], capture_output=True, text=True,
                                 timeout=120)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise ClusterError(f"{cluster_yaml}: `ray get-head-ip` failed ({one_line(e)}); set "
                               "metadata.hci_atr.dashboard_address in the file") from None
        lines = res.stdout.strip().splitlines()
        if res.returncode != 0 or not lines:
            raise ClusterError(f"{cluster_yaml}: `ray get-head-ip` found no head (is the cluster up? `ray up "
                               f"{cluster_yaml}`); or set metadata.hci_atr.dashboard_address in the file")
        addr = lines[-1].strip()
    addr = str(addr)
    if "://" not in addr:
        addr = "http://" + addr
    u = urlparse(addr)
    if not u.hostname:
        raise ClusterError(f"{cluster_yaml}: cannot read a head address from {addr!r}")
    return f"{u.scheme}://{u.hostname}:{u.port or DASHBOARD_PORT}"


# -- job submission ---------------------------------------------------------------------------------------------


PACKAGES = ("hci_atr", "workflows", "serve")


def project_root() -> Path | None:
    """The checkout this code runs from (a folder with the project's pyproject.toml and its packages), or None for an
    installed (non-editable) package."""
    here = Path(__file__).resolve().parent.parent
    pyproject = here / "pyproject.toml"
    if pyproject.is_file() and all((here / p).is_dir() for p in PACKAGES):
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            return here if 'name = "hci-atr"' in pyproject.read_text(encoding="utf-8") else None
        try:
            name = tomllib.loads(pyproject.read_text(encoding="utf-8")).get("project", {}).get("name")
        except (OSError, ValueError):
            return None
        return here if name == "hci-atr" else None
    return None


def job_source(root: Path | None = None) -> dict:
    """The runtime_env entries that ship the project's code with a job: the checkout as working_dir (minus data,
    outputs and secrets), or for an installed package the three package folders as py_modules. Never the current
    directory, which may be a home folder full of keys."""
    root = project_root() if root is None else root
    if root is not None:
        return {"working_dir": os.fspath(root), "excludes": WORKING_DIR_EXCLUDES}
    import importlib

    mods = [os.fspath(Path(importlib.import_module(p).__file__).resolve().parent) for p in PACKAGES]
    return {"py_modules": mods, "excludes": WORKING_DIR_EXCLUDES}


def strip_cluster_args(argv: Sequence[str]) -> list[str]:
    """``argv`` without ``--cluster X`` / ``--cluster=X`` (the job runs the same command on the cluster itself)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--cluster":
            skip = True
        elif not a.startswith("--cluster="):
            out.append(a)
    return out


# Settings of the submitting shell that the job's driver on the head needs too: where MLflow tracks (a run started
# with MLFLOW_TRACKING_URI set must log to the same server from the cluster) and the offline switches.
FORWARDED_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME",
                 "MLFLOW_TRACKING_PASSWORD", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")

# options whose value is a path the job opens on the cluster: relative ones would resolve inside the job's temporary
# working folder on the head (and vanish with it)
PATH_OPTIONS = ("--data", "--out", "--features", "--captions", "--storage-path", "--audio-checkpoint", "--config")


def redact_uri(text: str) -> str:
    """``scheme://user:secret@host`` -> ``scheme://***@host`` anywhere in ``text`` (what is echoed or logged)."""
    import re

    return re.sub(r"([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@", r"\1***@", text)


def _option_values(args: Sequence[str], name: str) -> list[str]:
    out = []
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            out.append(args[i + 1])
        elif a.startswith(name + "="):
            out.append(a.split("=", 1)[1])
    return out


def _local_tracking(uri: str) -> bool:
    """A tracking URI that names a file on this machine: SQLite, file: or a plain path."""
    u = urlparse(uri)
    return u.scheme in ("sqlite", "file", "") or len(u.scheme) == 1  # "C:" paths count as local too


def check_cluster_args(args: Sequence[str], environ: dict[str, str] | None = None) -> None:
    """Refuse, before anything is submitted, what would silently lose work on a cluster: relative paths, and for
    `train` a relative storage path or a tracking store on the submitting machine's disk."""
    environ = os.environ if environ is None else environ
    for opt in PATH_OPTIONS:
        for v in _option_values(args, opt):
            if v and not os.path.isabs(v) and "://" not in v and opt != "--config":
                raise ClusterError(f"{opt} {v}: a relative path would resolve inside the job's temporary working "
                                   f"folder on the head; give an absolute path on storage every node mounts "
                                   f"(e.g. /mnt/shared/...)")
    if not args or args[0] != "train":
        return
    from workflows.settings import load_settings

    configs = _option_values(args, "--config")
    settings = load_settings(configs[-1] if configs else None)
    storage = (_option_values(args, "--storage-path") or [settings.run.storage_path])[-1]
    if not os.path.isabs(storage) and "://" not in storage:
        raise ClusterError(f"run.storage_path {storage}: relative, so checkpoints would vanish with the job's working "
                           f"folder and a re-run could not resume; pass --storage-path /mnt/shared/... (or set "
                           f"run.storage_path in the --config file)")
    uri = (_option_values(args, "--tracking-uri") or [settings.run.tracking_uri or environ.get("MLFLOW_TRACKING_URI")
                                                      or "sqlite:///mlflow.db"])[-1]
    if _local_tracking(uri):
        path = uri.split(":///", 1)[-1] if ":///" in uri else uri
        if not (uri.startswith("sqlite:////") or uri.startswith("file:///") or os.path.isabs(path)):
            raise ClusterError(f"MLflow tracking {redact_uri(uri)}: a local relative store would live in the job's "
                               f"temporary folder on the head; set MLFLOW_TRACKING_URI (or --tracking-uri) to an "
                               f"MLflow server (http://host:5000) or an absolute sqlite:////mnt/shared/... path")


def job_env_vars(environ: dict[str, str] | None = None, token_mode: bool = False) -> dict[str, str]:
    """Environment of a submitted job: unbuffered output, the :data:`FORWARDED_ENV` values set here, token auth."""
    environ = os.environ if environ is None else environ
    env = {"PYTHONUNBUFFERED": "1", **{k: environ[k] for k in FORWARDED_ENV if environ.get(k)}}
    if token_mode:
        env["RAY_AUTH_MODE"] = "token"  # the job's driver joins a token-auth cluster too
    return env


def _read_token() -> str | None:
    """The cluster token, as Ray's own clients look for it: $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if path.is_file():
        return path.read_text(encoding="utf-8").strip() or None
    return None


def _token_available() -> bool:
    return _read_token() is not None


@contextlib.contextmanager
def _auth_env() -> Iterator[bool]:
    """Run the Jobs API client with ``RAY_AUTH_MODE=token`` when a token exists (restored afterwards)."""
    use = _token_available() and "RAY_AUTH_MODE" not in os.environ
    if use:
        os.environ["RAY_AUTH_MODE"] = "token"
    try:
        yield use or os.environ.get("RAY_AUTH_MODE", "").lower() == "token"
    finally:
        if use:
            os.environ.pop("RAY_AUTH_MODE", None)


def submit_self_as_job(cluster_yaml: str | os.PathLike, argv: Sequence[str], *, echo=None,
                       working_dir: str | os.PathLike | None = None) -> int:
    """Run ``hci-atr <argv minus --cluster>`` as a Ray job on the cluster of ``cluster_yaml``; stream its logs.

    Returns 0 when the job succeeded, 1 otherwise. Raises :class:`ClusterError` when the head cannot be reached or
    refuses the job.
    """
    from ray.job_submission import JobSubmissionClient

    echo = echo or (lambda s: print(s, end="", flush=True))
    args = strip_cluster_args(argv)
    check_cluster_args(args)
    address = dashboard_address(cluster_yaml)
    entrypoint = "python -m workflows.cli " + " ".join(shlex.quote(a) for a in args)
    with _auth_env() as token_mode:
        try:
            # Ray reads RAY_AUTH_MODE once per process, so a client made after `import ray` may not see it: send
            # the bearer token ourselves as well.
            token = _read_token() if token_mode else None
            headers = {"Authorization": f"Bearer {token}"} if token else None
            client = JobSubmissionClient(address, headers=headers)
        except Exception as e:
            raise ClusterError(f"cannot reach the Ray head at {address} ({one_line(e)}); is the cluster up "
                               f"(`ray up {cluster_yaml}`) and the dashboard port reachable?") from None
        source = job_source(Path(working_dir)) if working_dir else job_source()
        runtime_env = {**source, "env_vars": job_env_vars(token_mode=token_mode)}
        job_id = _submit_with_retry(client, address, entrypoint=entrypoint, runtime_env=runtime_env,
                                    metadata={"hci_atr": " ".join(args[:1])})
        echo(f"submitted job {job_id} to {address}: hci-atr {redact_uri(' '.join(args))}\n")
        try:
            asyncio.run(_tail(client, job_id, echo))
            status = _wait_terminal(client, job_id)
        except KeyboardInterrupt:
            echo(f"\nstopped following; the job keeps running. Stop it with: ray job stop {job_id} "
                 f"--address {address}\n")
            return 130
    echo(f"job {job_id} {status}\n")
    return 0 if status == "SUCCEEDED" else 1


def _submit_with_retry(client, address: str, retry_s: float = 90.0, **job) -> str:
    """Submit; while the head's job agent is still starting (just after `ray up` / `ray start`) the head answers
    "No available agent", so retry that one answer for up to ``retry_s`` seconds."""
    deadline = time.monotonic() + retry_s
    while True:
        try:
            return client.submit_job(**job)
        except Exception as e:
            if "No available agent" in str(e) and time.monotonic() < deadline:
                time.sleep(1.0)
                continue
            raise ClusterError(f"the Ray head at {address} refused the job ({one_line(e)})") from None


async def _tail(client, job_id: str, echo) -> None:
    async for lines in client.tail_job_logs(job_id):
        echo(lines)


def _wait_terminal(client, job_id: str) -> str:
    """The log stream ends with the job; the status may lag a moment behind, so poll until it is terminal."""
    for _ in range(600):
        status = str(client.get_job_status(job_id)).split(".")[-1]
        if status in TERMINAL:
            return status
        time.sleep(0.2)
    return status


def run_or_submit(cluster: str | None, argv: Sequence[str] | None) -> int | None:
    """CLI helper: with ``--cluster`` submit and return the job's exit code; without it return None (run here)."""
    if not cluster:
        return None
    return submit_self_as_job(cluster, list(argv if argv is not None else sys.argv[1:]))
