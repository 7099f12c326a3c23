"""Submit a Ray Jobs spec (jobs/*.yaml) to a cluster through Ray's JobSubmissionClient.

${VAR} in the spec is filled from the submitting environment; the arguments after `--` are appended
to the entrypoint (later flags win, so they replace a spec's YOUR_... example values). With --wait
it follows the job to the end and exits non-zero unless it SUCCEEDED. Every argument of this command
is checked before Ray is asked, so a malformed one is one line, not Ray's traceback.

stdout holds what scripts read: the job id it submitted and, with --wait, its end status. Notices
(a timeout, Ctrl-C) are `submit:` lines on the console channel; a failed job's last logs go to stderr
as they are.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import sys
import time
import urllib.parse

import yaml

from stages.core import console
from stages.core.config.engine import Parser, with_default
from stages.core.errors import PipelineError

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# What JobSubmissionClient.submit_job takes (Ray 2.60); `job_id` is its deprecated name for submission_id.
SUBMIT_KEYS = ("entrypoint", "runtime_env", "metadata", "submission_id", "entrypoint_num_cpus",
               "entrypoint_num_gpus", "entrypoint_memory", "entrypoint_resources", "entrypoint_label_selector")
# Environment variable names that hold credentials: never sent in a runtime_env, which every Jobs API
# client (`ray job list`, the SDK, the dashboard) reads back in plain text.
_SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|PRIVATE|ACCESS_KEY|API_KEY|(^|_)KEY($|_)",
                          re.IGNORECASE)


class SubmitError(PipelineError):
    """A job spec that cannot be submitted as it is; the message names the file and what is missing."""


def expand(value, missing: set[str]):
    if isinstance(value, str):
        def sub(m):
            if m.group(1) not in os.environ:
                missing.add(m.group(1))
            return os.environ.get(m.group(1), "")
        return _VAR.sub(sub, value)
    if isinstance(value, dict):
        return {k: expand(v, missing) for k, v in value.items()}
    if isinstance(value, list):
        return [expand(v, missing) for v in value]
    return value


def load_spec(path: str, extra_args: list[str]) -> dict:
    """The spec with ${VAR}s filled in: required in the entrypoint, optional in env_vars (unset ones
    are dropped so the cluster's own defaults apply)."""
    try:
        with open(path) as fh:
            spec = yaml.safe_load(fh)
    except (OSError, yaml.YAMLError) as e:
        raise SubmitError(f"{path}: cannot read the job spec ({e})") from None
    if not isinstance(spec, dict) or "entrypoint" not in spec:
        raise SubmitError(f"{path}: a Ray Jobs spec needs an 'entrypoint'")
    unknown = sorted(set(spec) - set(SUBMIT_KEYS))
    if unknown:
        raise SubmitError(f"{path}: unknown key(s) {', '.join(map(repr, unknown))}; a Ray Jobs spec takes "
                          f"{', '.join(SUBMIT_KEYS)}")
    runtime_env = dict(spec.get("runtime_env") or {})
    env = runtime_env.pop("env_vars", {}) or {}
    secrets = sorted(k for k in env if _SECRET_NAME.search(k))
    if secrets:
        raise SubmitError(f"{path}: runtime_env.env_vars sets {', '.join(secrets)}: a job's runtime_env is readable "
                          "by every Jobs API client (ray job list, the SDK, the dashboard), so credentials never "
                          "go there. Remove them from the spec and give them to the cluster itself: a Kubernetes "
                          "Secret on KubeRay (jobs/kuberay/), the nodes' environment or an instance role elsewhere")
    missing: set[str] = set()
    spec = {**expand({k: v for k, v in spec.items() if k != "runtime_env"}, missing),
            "runtime_env": expand(runtime_env, missing)}
    if missing:
        raise SubmitError(f"{path}: set {', '.join(sorted(missing))} in the environment before submitting")
    filled = {k: expand(v, set()) for k, v in env.items()}
    spec["runtime_env"]["env_vars"] = {k: v for k, v in filled.items() if v != ""}
    wd = spec["runtime_env"].get("working_dir")
    if wd and "://" not in wd and not os.path.isabs(wd):  # relative to the repository root
        spec["runtime_env"]["working_dir"] = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)),
                                                                           "..", wd))
    spec["entrypoint"] = " ".join([spec["entrypoint"].strip(), *extra_args])
    left = placeholders_left(spec["entrypoint"])
    if left:
        raise SubmitError(f"{path}: the entrypoint still holds {', '.join(f'{f} {v}' for f, v in left)}: edit the "
                          f"spec or give your values after `--` (`pipeline.py submit {path} -- "
                          f"{' '.join(f'{f} VALUE' for f, _ in left)}`); later flags win")
    return spec


def placeholders_left(entrypoint: str) -> list[tuple[str, str]]:
    """(flag, value) of each YOUR_... example value that no later flag of the same name replaces."""
    words = entrypoint.split()
    return [(words[i - 1], w) for i, w in enumerate(words)
            if "YOUR_" in w and i and words[i - 1].startswith("--") and words[i - 1] not in words[i + 1:]]


def _submit(client, spec: dict, patience_s: float = 60.0) -> tuple[str, bool]:
    """Submit; returns (submission id, whether this call created the job). A cluster that has just
    started answers "No available agent to submit job, please try again later" until its job agent is
    up (no job is created then): try again for a while. A spec's `submission_id` makes a retried
    submission idempotent: a job that already has it is the job (Ray refuses a second one)."""
    kwargs = {k: spec[k] for k in SUBMIT_KEYS if spec.get(k) is not None}
    kwargs["metadata"] = {k: str(v) for k, v in (spec.get("metadata") or {}).items()}
    deadline = time.time() + patience_s
    while True:
        try:
            return client.submit_job(**kwargs), True
        except RuntimeError as e:
            if spec.get("submission_id") and "already exists" in str(e):
                return spec["submission_id"], False
            if "No available agent" not in str(e) or time.time() > deadline:
                raise
            time.sleep(2)


DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# Where Ray's client looks for the address before its own argument, in this order.
_ADDRESS_VARS = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")


def check_address(address: str) -> str:
    """The --address a user typed, if it is a Ray dashboard URL; Ray's own answer to a malformed one is
    a traceback ("Invalid address format"), and one without a scheme is taken for a GCS address."""
    parts = urllib.parse.urlsplit(address)
    try:
        port_ok = parts.port is None or parts.port > 0
    except ValueError:  # a port that is not a number
        port_ok = False
    if parts.scheme not in ("http", "https", "ray") or not parts.hostname or not port_ok:
        raise SubmitError(f"--address {address!r} is not a Ray dashboard address: give its URL, http://HOST:8265 "
                          "(https://... behind TLS, or a Ray Client address ray://HOST:10001)")
    return address


def resolve_address(given: str | None) -> tuple[str, str]:
    """(address, where it came from): --address, else the variables Ray's client reads, else the local
    dashboard. Only a typed --address is checked here; Ray knows the forms its variables take ('auto')."""
    if given is not None:
        return check_address(given), "--address"
    for var in _ADDRESS_VARS:
        if os.environ.get(var):
            return os.environ[var], f"${var}"
    return DEFAULT_ADDRESS, "the default"


@contextlib.contextmanager
def _only(address: str):
    """Ray's client takes $RAY_API_SERVER_ADDRESS (then $RAY_ADDRESS) over the address it is given: for
    the time it starts, that variable is the address, so the job goes where this command says it goes."""
    kept = os.environ.get(_ADDRESS_VARS[0])
    os.environ[_ADDRESS_VARS[0]] = address
    try:
        yield
    finally:
        if kept is None:
            os.environ.pop(_ADDRESS_VARS[0], None)
        else:
            os.environ[_ADDRESS_VARS[0]] = kept


def connect(address: str, source: str):
    """A JobSubmissionClient of the dashboard at `address`; every way of not reaching one is one line."""
    from ray.job_submission import JobSubmissionClient

    try:
        with _only(address):
            return JobSubmissionClient(address)
    except OSError as e:  # ConnectionError, and requests' errors (timeouts, proxies) are OSErrors
        raise SubmitError(f"cannot reach the Ray dashboard at {address} ({source}): {_first_line(e)}") from None
    except (ValueError, RuntimeError) as e:  # a malformed address from the environment; a server that is no dashboard
        raise SubmitError(f"{address} ({source}) is not a Ray dashboard that takes jobs: {_first_line(e)}") from None


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def parser() -> Parser:
    # A job's flag before `--` is refused, not sent on: a misspelt --adress would reach the job's command.
    ap = Parser(prog="pipeline.py submit", description=__doc__.splitlines()[0],
                usage="%(prog)s SPEC [--address URL] [--wait [--timeout SECONDS]] [-- FLAGS FOR THE JOB ...]",
                unrecognized_hint="flags for the job go after `--`: `pipeline.py submit SPEC -- --data ...`")
    ap.add_argument("spec", help="jobs/precompute.yaml, jobs/train.yaml, jobs/nightly.yaml or jobs/iterate.yaml")
    ap.add_argument("--address", metavar="URL",
                    help=f"Ray dashboard URL, http://HOST:8265 (default: ${_ADDRESS_VARS[0]}, else "
                         f"${_ADDRESS_VARS[1]}, else {DEFAULT_ADDRESS})")
    ap.add_argument("--wait", action="store_true", help="follow the job until it ends (default: off)")
    ap.add_argument("--timeout", type=float, metavar="SECONDS",
                    help=with_default("with --wait: seconds to wait at most", None))
    return ap


def _parse(argv: list[str]):
    """This command's arguments, and the job's: everything after the first `--`."""
    cut = argv.index("--") if "--" in argv else len(argv)
    ap = parser()
    args = ap.parse_args(argv[:cut])
    if args.timeout is not None and not (math.isfinite(args.timeout) and args.timeout > 0):
        ap.error(f"--timeout: must be a positive number of seconds, got {args.timeout:g}")
    if args.timeout is not None and not args.wait:
        ap.error("--timeout needs --wait (without it the command returns once the job is submitted)")
    return args, argv[cut + 1:]


def main(argv: list[str]) -> int:
    args, extra = _parse(argv)
    address, source = resolve_address(args.address)
    spec = load_spec(args.spec, extra)
    client = connect(address, source)
    try:
        job_id, created = _submit(client, spec)
    except (RuntimeError, ValueError) as e:  # the dashboard's answer (status 400, 500): its first line says why
        raise SubmitError(f"the Ray dashboard at {address} ({source}) refused the job: {_first_line(e)}") from None
    print(f"submitted {job_id} to {address}" if created else
          f"{job_id} was already submitted to {address}: following that job, not starting another")
    if not args.wait:
        return 0
    try:
        return _follow(client, job_id, args.timeout)
    except KeyboardInterrupt:  # the job is the cluster's now: say so, and how to stop it
        console.line("")  # ends the line the terminal's ^C was echoed on
        console.say("submit", f"stopped following {job_id}: it keeps running on the cluster; `ray job stop {job_id} "
                    f"--address {address}` stops it")
        return 130


def _follow(client, job_id: str, timeout: float | None) -> int:
    """Wait for the job's end; 0 when it SUCCEEDED, 1 otherwise (its last logs printed) or on timeout."""
    from ray.job_submission import JobStatus

    deadline = time.time() + timeout if timeout else None
    status = client.get_job_status(job_id)
    while status not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        if deadline and time.time() > deadline:
            console.say("submit", f"{job_id}: still {status} after {timeout:.0f}s")
            return 1
        time.sleep(2)
        status = client.get_job_status(job_id)
    print(f"{job_id}: {status}")
    if status != JobStatus.SUCCEEDED:
        print(client.get_job_logs(job_id)[-5000:], file=sys.stderr)
        return 1
    return 0
