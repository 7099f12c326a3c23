"""Submit a Ray Jobs spec (jobs/*.yaml) to a cluster through Ray's JobSubmissionClient.

${VAR} in the spec is filled from the submitting environment; extra CLI arguments are appended
to the entrypoint (later flags win, so they replace a spec's YOUR_... example values). With --wait
it follows the job to the end and exits non-zero unless it SUCCEEDED.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

import yaml

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


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="pipeline.py submit", description=__doc__.splitlines()[0])
    ap.add_argument("spec", help="jobs/precompute.yaml or jobs/train.yaml")
    ap.add_argument("--address", default=os.environ.get("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:8265"),
                    help="Ray dashboard address (default: $RAY_API_SERVER_ADDRESS or http://127.0.0.1:8265)")
    ap.add_argument("--wait", action="store_true", help="follow the job until it ends")
    ap.add_argument("--timeout", type=float, default=None, help="seconds to wait at most")
    args, extra = ap.parse_known_args(argv)
    from ray.job_submission import JobStatus, JobSubmissionClient

    spec = load_spec(args.spec, [a for a in extra if a != "--"])
    try:
        client = JobSubmissionClient(args.address)
    except ConnectionError as e:
        raise SubmitError(f"cannot reach the Ray dashboard at {args.address}: {e}") from None
    job_id, created = _submit(client, spec)
    print(f"submitted {job_id} to {args.address}" if created else
          f"{job_id} was already submitted to {args.address}: following that job, not starting another")
    if not args.wait:
        return 0
    deadline = time.time() + args.timeout if args.timeout else None
    status = client.get_job_status(job_id)
    while status not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        if deadline and time.time() > deadline:
            print(f"{job_id}: still {status} after {args.timeout:.0f}s", file=sys.stderr)
            return 1
        time.sleep(2)
        status = client.get_job_status(job_id)
    print(f"{job_id}: {status}")
    if status != JobStatus.SUCCEEDED:
        print(client.get_job_logs(job_id)[-5000:], file=sys.stderr)
        return 1
    return 0
