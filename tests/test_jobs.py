"""The Kubernetes side, checked without a cluster, Ray or the network.

- Every RayJob/RayCronJob under jobs/kuberay/ and jobs/examples/ against the KubeRay CRDs (tests/kuberay/, gzipped
  copies from the v1.6.0 and v1.7.0 tags) with the API server's structural-schema rules: a field the schema does not
  list is an error. A manifest's header says the oldest KubeRay it needs (`# kuberay: >=1.7`); it must validate
  against every copied release from that one on, and must fail against the older ones (else the marker is wrong).
- The settings that keep a job from holding GPUs forever (deadlines, clean-up) and KubeRay's own rules on them.
- Each entrypoint as the operator's submitter pod runs it: pasted unquoted into a `bash -ce` script after
  `ray job submit ... --`, with a stub `ray` on PATH that records what arrives. It must arrive whole.
- Credentials only from Secrets; the example Secrets out of jobs/kuberay/; the Dockerfile against the manifests.
"""

from __future__ import annotations

import copy
import gzip
import json
import os
import re
import shlex
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import pytest
import yaml
from conftest import ROOT
from jsonschema import Draft7Validator
from packaging.specifiers import SpecifierSet

CRDS = ROOT / "tests" / "kuberay"  # KubeRay's CRDs, copied unchanged (tests/kuberay/SOURCES.md)
RELEASES = {(1, 6): "v1.6.0", (1, 7): "v1.7.0"}
CRD_FILES = {"RayJob": "ray.io_rayjobs.yaml.gz", "RayCronJob": "ray.io_raycronjobs.yaml.gz"}
KUBERAY = ROOT / "jobs" / "kuberay"
EXAMPLES = ROOT / "jobs" / "examples"
MARKER = re.compile(r"^# kuberay: >=(\d+)\.(\d+)$", re.M)
S3_SECRET, HF_SECRET, HF_KEY = "dpo-s3-credentials", "dpo-hf-token", "HF_TOKEN"


# ---- the manifests ----------------------------------------------------------------------------------------------

def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _header(path: Path) -> str:
    """The comment lines a manifest starts with."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return "\n".join(lines)


def _ray_manifests() -> list[Path]:
    paths = sorted(KUBERAY.glob("*.yaml")) + sorted(EXAMPLES.glob("*.yaml"))
    return [p for p in paths if any(d.get("kind") in CRD_FILES for d in _docs(p))]


RAY_MANIFESTS = _ray_manifests()
JOB_SPECS = sorted(p for p in (ROOT / "jobs").glob("*.yaml") if "entrypoint" in (yaml.safe_load(p.read_text()) or {}))


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _job_spec(doc: dict) -> dict:
    """The RayJob spec of a RayJob, or the one a RayCronJob stamps out."""
    return doc["spec"]["jobTemplate"] if doc["kind"] == "RayCronJob" else doc["spec"]


def _manifest(path: Path) -> dict:
    (doc,) = _docs(path)
    return doc


def _entrypoints() -> list[tuple[str, str]]:
    found = [(_rel(p), _job_spec(_manifest(p))["entrypoint"]) for p in RAY_MANIFESTS]
    return found + [(_rel(p), yaml.safe_load(p.read_text())["entrypoint"]) for p in JOB_SPECS]


ENTRYPOINTS = _entrypoints()


def _containers(spec: dict) -> list[dict]:
    cluster = spec["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]
    return [c for pod in pods for c in pod["template"]["spec"]["containers"]]


def test_the_manifests_are_there():
    names = {p.name for p in RAY_MANIFESTS}
    assert {"rayjob-precompute.yaml", "rayjob-train.yaml", "rayjob-nightly.yaml", "raycronjob-nightly.yaml",
            "rayjob-online-round.yaml", "raycronjob-online.yaml"} <= names, names
    assert {_rel(p) for p in JOB_SPECS} >= {"jobs/precompute.yaml", "jobs/train.yaml", "jobs/iterate.yaml"}
    assert all(len(_docs(p)) == 1 for p in RAY_MANIFESTS), "one object per manifest file"


# ---- the CRDs as JSON Schema ------------------------------------------------------------------------------------

def structural(node):
    """A CRD's OpenAPI v3 schema node as JSON Schema, with the API server's rules: an object node that lists
    properties refuses any other field unless it says x-kubernetes-preserve-unknown-fields; an int-or-string takes
    either; the other x-kubernetes-* extensions (list types, CEL rules) are left out (see _deletion_problems)."""
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {name: structural(sub) for name, sub in value.items()}
        elif key in ("items", "not") or (key == "additionalProperties" and isinstance(value, dict)):
            out[key] = structural(value)
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = [structural(sub) for sub in value]
        elif not key.startswith("x-kubernetes-") and key != "nullable":
            out[key] = value
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if node.get("nullable") and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    if "properties" in node and "additionalProperties" not in node and not node.get(
            "x-kubernetes-preserve-unknown-fields"):
        out["additionalProperties"] = False
    bits = {"int32": 31, "int64": 63}.get(out.get("format"))
    if bits:
        out.setdefault("minimum", -(2 ** bits))
        out.setdefault("maximum", 2 ** bits - 1)
    return out


@lru_cache(maxsize=None)
def validator(release: str, kind: str) -> Draft7Validator:
    path = CRDS / release / CRD_FILES[kind]
    crd = yaml.load(gzip.decompress(path.read_bytes()), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    assert crd["spec"]["names"]["kind"] == kind
    (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = structural(v1["schema"]["openAPIV3Schema"])
    Draft7Validator.check_schema(schema)
    return Draft7Validator(schema)


def schema_errors(doc: dict, release: str) -> list[str]:
    errors = validator(release, doc["kind"]).iter_errors(doc)
    return sorted(f"{'.'.join(map(str, e.absolute_path)) or '<top>'}: {e.message[:200]}" for e in errors)


def _needs(path: Path) -> tuple[int, int]:
    found = MARKER.findall(_header(path))
    assert len(found) == 1, f"{_rel(path)}: its header needs one line `# kuberay: >=MAJOR.MINOR`"
    return int(found[0][0]), int(found[0][1])


@pytest.mark.parametrize("release", sorted(RELEASES.values()))
@pytest.mark.parametrize("path", RAY_MANIFESTS, ids=_rel)
def test_manifest_against_the_crd(path, release):
    doc = _manifest(path)
    assert doc["apiVersion"] == "ray.io/v1"
    errors = schema_errors(doc, release)
    version = next(v for v, name in RELEASES.items() if name == release)
    if version >= _needs(path):
        assert not errors, f"{_rel(path)} against KubeRay {release}:\n" + "\n".join(errors)
    else:
        assert errors, f"{_rel(path)} says it needs KubeRay >= {_needs(path)}, yet {release} accepts it"


def _set(doc: dict, dotted: str, value) -> dict:
    doc = copy.deepcopy(doc)
    *parents, leaf = dotted.split(".")
    node = doc
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    node[leaf] = value
    return doc


HEAD_CONTAINER = "spec.rayClusterSpec.headGroupSpec.template.spec.containers.0"


@pytest.mark.parametrize("release", sorted(RELEASES.values()))
@pytest.mark.parametrize("dotted, value", [
    ("spec.bogusField", 1),                                  # unknown at the top of the spec
    ("spec.activeDeadlineSeconds", "six hours"),             # wrong type
    ("spec.backoffLimit", "2"),                              # a number as a string
    ("spec.preRunningDeadlineSeconds", 0),                   # below the schema's minimum (1)
    ("spec.ttlSecondsAfterFinished", 2 ** 31),               # past int32
    ("spec.rayClusterSpec.rayVersoin", "2.60.0"),            # a typo, deep down
    (f"{HEAD_CONTAINER}.env.1.valueFrom.secretKeyRef.optionnal", True),
    (f"{HEAD_CONTAINER}.resources.limits.cpu", "four"),      # not a quantity
    ("spec.deletionStrategy", {"deletionRules": [{"policy": "DeleteAll", "condition": {"jobStatus": "FAILED"}}]}),
])
def test_the_schema_check_catches(dotted, value, release):
    """The check can fail: a copy of a valid manifest with one mistake is refused by both releases."""
    doc = _manifest(KUBERAY / "rayjob-train.yaml")
    assert not schema_errors(doc, release)
    assert schema_errors(_set(doc, dotted, value), release), f"{dotted}={value!r} passed"


def test_time_zone_is_refused_by_1_6_and_taken_by_1_7():
    """What the RayCronJob's header says: spec.timeZone exists from KubeRay 1.7.0 on."""
    doc = _set(_manifest(KUBERAY / "raycronjob-nightly.yaml"), "spec.timeZone", "Etc/UTC")
    assert any("timeZone" in e for e in schema_errors(doc, "v1.6.0"))
    assert not schema_errors(doc, "v1.7.0")


# ---- what the schema does not say -------------------------------------------------------------------------------

def _deletion_problems(spec: dict) -> list[str]:
    """KubeRay's validateDeletionConfiguration and the CEL rules on deletionStrategy, which the operator or the
    API server apply to a RayJob and the JSON Schema above leaves out."""
    shutdown, ttl = spec.get("shutdownAfterJobFinishes", False), spec.get("ttlSecondsAfterFinished", 0)
    strategy = spec.get("deletionStrategy")
    problems = ["ttlSecondsAfterFinished without shutdownAfterJobFinishes"] if ttl and not shutdown else []
    if strategy is None:
        return problems
    rules, legacy = strategy.get("deletionRules") or [], {"onSuccess", "onFailure"} & set(strategy)
    if rules and legacy:
        problems.append("deletionRules together with onSuccess/onFailure")
    if rules and shutdown:
        problems.append("deletionRules together with shutdownAfterJobFinishes")
    if not rules and legacy != {"onSuccess", "onFailure"}:
        problems.append("deletionStrategy needs deletionRules or both onSuccess and onFailure")
    ttls: dict[tuple[str, str], dict[str, int]] = {}
    for rule in rules:
        keys = [k for k in ("jobStatus", "jobDeploymentStatus") if k in rule["condition"]]
        if len(keys) != 1:
            problems.append(f"a condition needs exactly one of jobStatus, jobDeploymentStatus: {rule}")
            continue
        by_policy = ttls.setdefault((keys[0], rule["condition"][keys[0]]), {})
        if rule["policy"] in by_policy:
            problems.append(f"two rules for {rule['policy']} on {keys[0]} {rule['condition'][keys[0]]}")
        by_policy[rule["policy"]] = rule["condition"].get("ttlSeconds", 0)
    for condition, by_policy in ttls.items():
        order = [by_policy[p] for p in ("DeleteWorkers", "DeleteCluster", "DeleteSelf") if p in by_policy]
        if order != sorted(order):
            problems.append(f"{condition}: TTLs must not decrease from DeleteWorkers to DeleteCluster to DeleteSelf")
    return problems


def _cleanup_problems(spec: dict) -> list[str]:
    """The cluster must go soon after the job, whatever its outcome: shutdownAfterJobFinishes with a short TTL,
    or deletion rules (KubeRay refuses the two together)."""
    rules = (spec.get("deletionStrategy") or {}).get("deletionRules")
    if not rules:
        ttl = spec.get("ttlSecondsAfterFinished", 0)
        ok = spec.get("shutdownAfterJobFinishes") is True and 0 <= ttl <= 600
        return [] if ok else [f"shutdownAfterJobFinishes: true and ttlSecondsAfterFinished <= 600 (is {ttl})"]
    held = {(r["policy"], r["condition"].get("jobStatus")) for r in rules if r["condition"].get("ttlSeconds", 0) <= 600}
    missing = [s for s in ("SUCCEEDED", "FAILED") if ("DeleteCluster", s) not in held]
    problems = [f"no DeleteCluster within 10 min on {s}" for s in missing]
    if not any(r["policy"] == "DeleteSelf" for r in rules):
        problems.append("deletion rules that never delete the RayJob itself")
    return problems


@pytest.mark.parametrize("path", RAY_MANIFESTS, ids=_rel)
def test_a_job_cannot_hold_gpus_forever(path):
    doc = _manifest(path)
    spec = _job_spec(doc)
    active, pre = spec.get("activeDeadlineSeconds"), spec.get("preRunningDeadlineSeconds")
    assert isinstance(active, int) and 0 < active <= 24 * 3600, f"activeDeadlineSeconds: {active}"
    assert isinstance(pre, int) and 0 < pre < active, f"preRunningDeadlineSeconds: {pre}"
    assert isinstance(spec.get("backoffLimit"), int) and spec["backoffLimit"] >= 0
    assert spec.get("submissionMode", "K8sJobMode") == "K8sJobMode", "the entrypoint checks below model K8sJobMode"
    assert not _deletion_problems(spec), _deletion_problems(spec)
    assert not _cleanup_problems(spec), _cleanup_problems(spec)
    if doc["kind"] == "RayCronJob":
        assert doc["spec"]["schedule"].split()[2:] == ["*", "*", "*"], "the check below assumes a daily schedule"
        assert (spec["backoffLimit"] + 1) * active < 24 * 3600, "every attempt of a night must end before the next"


@pytest.mark.parametrize("spec, problem", [
    ({"shutdownAfterJobFinishes": True, "deletionStrategy": {"deletionRules": [
        {"policy": "DeleteCluster", "condition": {"jobStatus": "FAILED"}}]}}, "shutdownAfterJobFinishes"),
    ({"ttlSecondsAfterFinished": 300}, "without shutdownAfterJobFinishes"),
    ({"deletionStrategy": {"onSuccess": {"policy": "DeleteSelf"}}}, "both onSuccess and onFailure"),
    ({"deletionStrategy": {"deletionRules": [
        {"policy": "DeleteSelf", "condition": {"jobStatus": "FAILED", "ttlSeconds": 10}},
        {"policy": "DeleteCluster", "condition": {"jobStatus": "FAILED", "ttlSeconds": 60}}]}}, "must not decrease"),
    ({"deletionStrategy": {"deletionRules": [
        {"policy": "DeleteSelf", "condition": {"jobStatus": "FAILED", "jobDeploymentStatus": "Failed"}}]}},
     "exactly one"),
])
def test_the_deletion_rules_check_catches(spec, problem):
    assert any(problem in p for p in _deletion_problems(spec)), _deletion_problems(spec)


def test_the_cleanup_check_catches():
    assert _cleanup_problems({"shutdownAfterJobFinishes": True, "ttlSecondsAfterFinished": 3600})
    assert _cleanup_problems({"shutdownAfterJobFinishes": False})
    assert _cleanup_problems({"deletionStrategy": {"deletionRules": [
        {"policy": "DeleteCluster", "condition": {"jobStatus": "SUCCEEDED"}}]}})


@pytest.mark.parametrize("path", RAY_MANIFESTS, ids=_rel)
def test_the_header_says_how_to_run_it(path):
    header, kind = _header(path), _manifest(path)["kind"]
    _needs(path)
    for needed in ("KubeRay 1.", "kubectl", "lease", "never restarts a finished"):
        assert needed in header, f"{_rel(path)}: the header does not mention {needed!r}"
    if kind == "RayCronJob":
        for needed in ("--feature-gates=RayCronJob=true", "featureGates", "timeZone", "concurrency"):
            assert needed in header, f"{_rel(path)}: the header does not mention {needed!r}"


# ---- the entrypoint, as the submitter pod runs it ---------------------------------------------------------------

# Anything a shell reads as more than words separated by blanks: operators, expansions, quotes, globs, comments.
SHELL_SYNTAX = re.compile(r"[&|;<>()$`\\'\"*?\[\]{}~#!\n\r\t]")


def static_problems(entrypoint: str) -> list[str]:
    problems = [f"shell syntax {c!r}" for c in sorted(set(SHELL_SYNTAX.findall(entrypoint.strip())))]
    if not entrypoint.strip().startswith("python pipeline.py "):
        problems.append("does not start with `python pipeline.py `")
    return problems


@pytest.mark.parametrize("where, entrypoint", ENTRYPOINTS, ids=[w for w, _ in ENTRYPOINTS])
def test_the_entrypoint_is_one_plain_command(where, entrypoint):
    assert not static_problems(entrypoint), f"{where}: {static_problems(entrypoint)}\n{entrypoint}"


CONFIGS = {"precompute": "PrecomputeConfig", "train": "TrainConfig", "run": "RunConfig", "eval": "EvalConfig",
           "iterate": "IterateConfig", "generate": "GenerateConfig", "judge": "JudgeConfig"}


def parse_entrypoint(entrypoint: str):
    """The entrypoint's flags through the command's own parser (no stage runs): a misspelt or removed flag
    fails here, not on the cluster after the GPUs came up."""
    from stages.core.config.commands import STAGE_CONFIGS
    from stages.core.config.engine import parse_args

    words = entrypoint.split()
    assert STAGE_CONFIGS[words[2]].__name__ == CONFIGS[words[2]]
    return parse_args(STAGE_CONFIGS[words[2]], words[3:], prog=f"pipeline.py {words[2]}")


@pytest.mark.parametrize("where, entrypoint", ENTRYPOINTS, ids=[w for w, _ in ENTRYPOINTS])
def test_the_entrypoint_parses(where, entrypoint):
    cfg = parse_entrypoint(entrypoint)
    if where.startswith(("jobs/kuberay/", "jobs/examples/")):
        assert cfg.device == "cuda" and cfg.progress is False, where


def test_the_parse_check_catches_an_unknown_flag(capsys):
    with pytest.raises(SystemExit):
        parse_entrypoint("python pipeline.py train --refs s3://b/refs --save-evry 200")
    assert "--save-evry" in capsys.readouterr().err


@pytest.mark.parametrize("entrypoint", ["python pipeline.py train && python pipeline.py eval",
                                        "python pipeline.py train --output s3://b/nightly-$(date +%F)",
                                        "python pipeline.py train --output s3://b/nightly-${DAY}",
                                        "python pipeline.py train\npython pipeline.py eval",
                                        "python pipeline.py train --tag 'a b'", "ray job submit"])
def test_the_static_check_catches(entrypoint):
    assert static_problems(entrypoint)


HEAD_URL = "http://rayjob-x-raycluster-abcde-head-svc.default.svc.cluster.local:8265"
JOB_ID = "rayjob-x-fg7hk"

STUB = """#!{python} -S
import json, os, sys
with open(os.environ["STUB_LOG"], "a") as log:
    log.write(json.dumps({{"prog": os.path.basename(sys.argv[0]), "argv": sys.argv[1:]}}) + "\\n")
sys.exit(1 if sys.argv[1:3] == ["job", "status"] else 0)
"""


def submitter_script(entrypoint: str) -> str:
    """The script KubeRay's submitter pod runs in K8sJobMode (ray-operator/controllers/ray/common/job.go,
    BuildJobSubmitCommand): words joined by single spaces, the entrypoint (trimmed) pasted in as one unquoted word
    after `--`, handed to `/bin/bash -ce --` as the container's args."""
    status = ["ray", "job", "status", "--address", HEAD_URL, JOB_ID, ">/dev/null", "2>&1"]
    submit = ["ray", "job", "submit", "--address", HEAD_URL, "--no-wait", "--submission-id", JOB_ID]
    follow = ["ray", "job", "logs", "--address", HEAD_URL, "--follow", JOB_ID]
    return " ".join(["if", "!", *status, ";", "then", *submit, "--", entrypoint.strip(), ";", "fi", ";", *follow])


def run_submitter(entrypoint: str, tmp_path: Path) -> tuple[int | str, list[dict]]:
    """Runs the submitter's script with stubs for `ray` and `python` first on PATH; returns bash's exit code (with
    its stderr when not 0) and every stub call (program name and argv)."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.jsonl"
    bin_dir.mkdir()
    for name in ("ray", "python", "python3"):
        (bin_dir / name).write_text(STUB.format(python=sys.executable))
        (bin_dir / name).chmod(0o755)
    env = {"PATH": f"{bin_dir}{os.pathsep}/usr/bin{os.pathsep}/bin", "STUB_LOG": str(log), "HOME": str(tmp_path)}
    done = subprocess.run(["/bin/bash", "-ce", "--", submitter_script(entrypoint)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    calls = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return done.returncode if done.returncode == 0 else f"{done.returncode}: {done.stderr[-500:]}", calls


def submitted(calls: list[dict]) -> list[list[str]]:
    """The entrypoints `ray job submit` received: its argv after `--`."""
    argvs = [c["argv"] for c in calls if c["prog"] == "ray" and c["argv"][:2] == ["job", "submit"]]
    return [argv[argv.index("--") + 1:] for argv in argvs]


def arrival_problems(entrypoint: str, code: int | str, calls: list[dict]) -> list[str]:
    problems = [] if code == 0 else [f"the submitter script exited {code}"]
    received = submitted(calls)
    if received != [entrypoint.split()]:
        problems.append(f"ray job submit received {received}, not {[entrypoint.split()]}")
    elif " ".join(received[0]) != " ".join(entrypoint.split()) or received[0] != shlex.split(entrypoint):
        problems.append("the words arrived changed")
    ran = [c for c in calls if not (c["prog"] == "ray" and c["argv"][:2] in (["job", "status"], ["job", "submit"],
                                                                               ["job", "logs"]))]
    if ran:
        problems.append(f"the submitter's own shell ran {ran}")
    return problems


@pytest.mark.parametrize("where, entrypoint", ENTRYPOINTS, ids=[w for w, _ in ENTRYPOINTS])
def test_the_entrypoint_arrives_whole(where, entrypoint, tmp_path):
    code, calls = run_submitter(entrypoint, tmp_path)
    assert not arrival_problems(entrypoint, code, calls), f"{where}: {arrival_problems(entrypoint, code, calls)}"


def test_the_stub_sees_a_chain_split_by_the_submitter_shell(tmp_path):
    """`a && b`: only `a` becomes the Ray job (submitted without waiting); `b` runs in the submitter pod."""
    entrypoint = "python pipeline.py train --refs r && python pipeline.py eval --refs r"
    code, calls = run_submitter(entrypoint, tmp_path)
    assert submitted(calls) == [["python", "pipeline.py", "train", "--refs", "r"]]
    assert {"prog": "python", "argv": ["pipeline.py", "eval", "--refs", "r"]} in calls
    assert arrival_problems(entrypoint, code, calls)


def test_the_stub_sees_a_substitution_expanded_by_the_submitter_shell(tmp_path):
    """`$(date ...)` is run by the submitter pod's shell, and the Ray job gets its output, not the text."""
    entrypoint = "python pipeline.py train --output s3://b/runs/nightly-$(date +%Y)"
    code, calls = run_submitter(entrypoint, tmp_path)
    (received,) = submitted(calls)
    assert re.fullmatch(r"s3://b/runs/nightly-\d{4}", received[-1]), received
    assert arrival_problems(entrypoint, code, calls)


# ---- credentials, the example Secrets -----------------------------------------------------------------------------

def test_no_secret_is_applied_with_the_folder():
    """`kubectl apply -f jobs/kuberay/` must never overwrite the real Secrets with placeholders."""
    for path in sorted(KUBERAY.iterdir()):
        if path.suffix in (".yaml", ".yml", ".json"):
            kinds = {d.get("kind") for d in _docs(path)}
            assert kinds <= set(CRD_FILES), f"{_rel(path)} holds {kinds}: only RayJob and RayCronJob belong here"
    for path in sorted((ROOT / "jobs").rglob("*.y*ml")):
        if any(d.get("kind") == "Secret" for d in _docs(path)):
            assert path == EXAMPLES / "secret.example.yaml", f"a Secret in {_rel(path)}"


def test_the_example_secrets_hold_placeholders_only():
    path = EXAMPLES / "secret.example.yaml"
    secrets = {d["metadata"]["name"]: d["stringData"] for d in _docs(path)}
    assert set(secrets) == {S3_SECRET, HF_SECRET}
    assert set(secrets[HF_SECRET]) == {HF_KEY}
    values = {k: v for data in secrets.values() for k, v in data.items() if k != "AWS_DEFAULT_REGION"}
    assert set(values.values()) == {"REPLACE_ME"}, values
    for name in (S3_SECRET, HF_SECRET):
        assert f"kubectl create secret generic {name}" in _header(path)


CREDENTIAL = re.compile(r"SECRET|TOKEN|PASSWORD|CREDENTIAL|ACCESS_KEY|API_KEY|_KEY$")


@pytest.mark.parametrize("path", RAY_MANIFESTS, ids=_rel)
def test_credentials_come_from_secrets(path):
    for container in _containers(_job_spec(_manifest(path))):
        where = f"{_rel(path)}: {container['name']}"
        assert {"secretRef": {"name": S3_SECRET}} in container.get("envFrom", []), where
        env = {e["name"]: e for e in container.get("env", [])}
        assert env.get(HF_KEY, {}).get("valueFrom") == {
            "secretKeyRef": {"name": HF_SECRET, "key": HF_KEY, "optional": True}}, where
        literal = [n for n, e in env.items() if CREDENTIAL.search(n) and "value" in e]
        assert not literal, f"{where}: credentials written in the manifest: {literal}"


# ---- the cluster and the image ---------------------------------------------------------------------------------

def _pyproject(pattern: str) -> str:
    return re.search(pattern, (ROOT / "pyproject.toml").read_text(), re.M).group(1)


@pytest.mark.parametrize("path", RAY_MANIFESTS, ids=_rel)
def test_the_cluster_fits_the_entrypoint(path):
    spec = _job_spec(_manifest(path))
    cluster, words = spec["rayClusterSpec"], spec["entrypoint"].split()
    assert "--device" in words and words[words.index("--device") + 1] == "cuda"
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", "the head takes no work"
    gpus = 0
    for group in cluster["workerGroupSpecs"]:
        assert group["replicas"] == group["minReplicas"] == group["maxReplicas"], group["groupName"]
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        gpus += group["replicas"] * int(limits.get("nvidia.com/gpu", 0))
    assert words[words.index("--num-workers") + 1] == str(gpus), "one worker per GPU"
    version = _pyproject(r'^version = "([^"]+)"')
    for container in _containers(spec):
        assert container["image"].endswith(f"/dpo-refstream:{version}"), container["image"]
        assert container["workingDir"] == "/app"


def test_the_dockerfile_matches_the_manifests():
    dockerfile = (ROOT / "Dockerfile").read_text()
    ray_versions = {_job_spec(_manifest(p))["rayClusterSpec"]["rayVersion"] for p in RAY_MANIFESTS}
    assert len(ray_versions) == 1, ray_versions
    (ray,) = ray_versions
    base = re.search(r"^ARG BASE=(\S+)$", dockerfile, re.M).group(1)
    tags = re.findall(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-(\w+)", dockerfile)
    assert base.startswith("rayproject/ray:") and len(tags) >= 2, "a rayproject/ray base, GPU and CPU"
    assert {t[0] for t in tags} == {ray}, f"base images {tags}, manifests' rayVersion {ray}"
    pythons = {f"{t[1]}.{t[2]}" for t in tags}
    assert len(pythons) == 1, f"GPU and CPU images on different Pythons: {pythons}"
    assert SpecifierSet(_pyproject(r'^requires-python = "([^"]+)"')).contains(pythons.pop())
    pins = re.findall(r'"ray(?:\[[^\]]*\])?==([^"]+)"', dockerfile)
    assert pins and set(pins) == {ray}, f"the pip install pins ray {pins}, the manifests run {ray}"
    assert set(re.findall(r"ray\.__version__ == '([^']+)'", dockerfile)) <= {ray}
    torch = re.search(r"^ARG TORCH_VERSION=(\S+)$", dockerfile, re.M).group(1)
    assert SpecifierSet(_pyproject(r'^\s*"torch([^"]*)"')).contains(torch)
    assert re.search(r"^WORKDIR /app$", dockerfile, re.M)
    ignored = set((ROOT / ".dockerignore").read_text().split())
    assert {".git", ".venv", "runs"} <= ignored


def _cluster_specs(doc: dict):
    """Every rayClusterSpec in a RayJob or a RayCronJob's RayJob template."""
    spec = doc.get("spec", {})
    for holder in (spec, spec.get("rayJobTemplate", {}).get("spec", {}), spec.get("jobTemplate", {})):
        if isinstance(holder, dict) and "rayClusterSpec" in holder:
            yield holder["rayClusterSpec"]


def test_every_cluster_takes_a_dashboard_token():
    """The dashboard / Jobs API of pods that hold storage credentials is never open: token auth on
    every Ray cluster a manifest makes."""
    import glob

    import yaml

    found = 0
    for path in sorted(glob.glob(str(ROOT / "jobs" / "**" / "*.yaml"), recursive=True)):
        for doc in yaml.safe_load_all(open(path)):
            if not isinstance(doc, dict) or doc.get("kind") not in ("RayJob", "RayCronJob"):
                continue
            specs = list(_cluster_specs(doc))
            assert specs, f"{path}: no rayClusterSpec found"
            for spec in specs:
                assert spec.get("authOptions", {}).get("mode") == "token", path
                found += 1
    assert found >= 7


def test_the_lock_file_is_current():
    """constraints.txt (what `make install` and the image install from) pins every dependency pyproject
    names, and each pin is the version installed here, the one the tests ran with."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, pinned = line.partition("==")
            pins[canonicalize_name(name)] = pinned
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        name = canonicalize_name(Requirement(dep).name)
        if name == "torch":  # installed first, from the CPU or CUDA index the machine needs
            continue
        assert name in pins, f"constraints.txt pins no {name}"
    stale = []
    for name, pinned in pins.items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            continue  # a platform-specific package absent here
        if installed != pinned:
            stale.append(f"{name}: pinned {pinned}, installed {installed}")
    assert not stale, "constraints.txt is stale (regenerate it, see its header): " + "; ".join(stale)


CRONJOB = ROOT / "jobs" / "kubernetes" / "cronjob-nightly.yaml"


def test_the_cronjob_and_its_rbac_against_kubernetes_schemas():
    """Strict: an unknown or misplaced field fails, as the API server would refuse it."""
    import kubernetes_validate

    docs = _docs(CRONJOB)
    assert [d["kind"] for d in docs] == ["ServiceAccount", "Role", "RoleBinding", "CronJob"]
    for doc in docs:
        kubernetes_validate.validate(doc, "1.30.0", strict=True)
    cron = docs[-1]["spec"]
    assert cron["concurrencyPolicy"] == "Forbid" and 0 < cron["startingDeadlineSeconds"] <= 3600
    (rule,) = docs[1]["rules"]
    assert rule == {"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["get", "create"]}
    with pytest.raises(kubernetes_validate.ValidationError):  # the check can fail
        kubernetes_validate.validate({**docs[-1], "spec": {**cron, "concurrency": "Forbid"}}, "1.30.0", strict=True)


def _run_creator(tmp_path, exists: bool) -> tuple[subprocess.CompletedProcess, Path]:
    """The CronJob's script with a stand-in kubectl: `get` answers as if tonight's RayJob exists (or not),
    `create -f -` keeps what it was given."""
    (tmp_path / "template").mkdir(exist_ok=True)
    (tmp_path / "template" / "rayjob.yaml").write_text((KUBERAY / "rayjob-nightly.yaml").read_text())
    created = tmp_path / "created.yaml"
    kubectl = tmp_path / "bin" / "kubectl"
    kubectl.parent.mkdir(exist_ok=True)
    kubectl.write_text(f"#!/bin/sh\nif [ \"$1\" = get ]; then exit {0 if exists else 1}; fi\ncat > {created}\n")
    kubectl.chmod(0o755)
    script = _docs(CRONJOB)[-1]["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]["args"][0]
    script = script.replace("/template/", f"{tmp_path}/template/")
    done = subprocess.run(["/bin/sh", "-c", script], capture_output=True, text=True,
                          env={**os.environ, "PATH": f"{kubectl.parent}:{os.environ['PATH']}"})
    return done, created


def test_the_cronjob_creates_one_rayjob_per_night_named_for_it(tmp_path):
    import datetime

    done, created = _run_creator(tmp_path, exists=False)
    assert done.returncode == 0, done.stderr
    job = yaml.safe_load(created.read_text())
    night = f"dpo-nightly-{datetime.datetime.now(datetime.timezone.utc):%Y%m%d}"
    assert job["metadata"]["name"] == night
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"name": "DPO_JOB_ID", "value": night} in head["env"]  # a retry of this RayJob keeps its lease
    for release in RELEASES.values():
        assert schema_errors(job, release) == []
    created.unlink()
    done, created = _run_creator(tmp_path, exists=True)  # tonight's exists: nothing created, no failure
    assert done.returncode == 0 and "created already" in done.stdout and not created.exists()


def test_job_identity_for_retries():
    """Every RayJob's head names the job in DPO_JOB_ID (its own name: a KubeRay retry of it takes over its
    predecessor's lease); no RayCronJob does (its ticks share one template) and each says to use KubeRay
    >= 1.7 only, pointing at the CronJob."""
    for path in RAY_MANIFESTS:
        doc = _manifest(path)
        head = _job_spec(doc)["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
        ids = [e.get("value") for e in head.get("env", []) if e["name"] == "DPO_JOB_ID"]
        if doc["kind"] == "RayJob":
            assert ids == [doc["metadata"]["name"]], _rel(path)
        else:
            assert ids == [], _rel(path)
            header = _header(path)
            assert "KubeRay >= 1.7 only" in header and "jobs/kubernetes/cronjob-nightly.yaml" in header, _rel(path)


def test_the_operators_guide_lists_every_manifest_and_names_only_real_ones():
    """docs/cloud.md's manifest table holds every file under jobs/, and every manifest path the guide names exists."""
    text = (ROOT / "docs" / "cloud.md").read_text()
    jobs = ROOT / "jobs"
    for path in sorted(jobs.rglob("*.yaml")):
        rel = path.relative_to(jobs).as_posix()
        assert f"`{rel}`" in text, f"docs/cloud.md's table does not list jobs/{rel}"
    named = set(re.findall(r"\b((?:jobs/)?(?:kuberay|kubernetes|examples)/[\w.-]+\.yaml)", text))
    named |= set(re.findall(r"\b(jobs/[a-z][\w.-]*\.yaml)", text))  # not the placeholder jobs/NAME.yaml
    assert len(named) > 10
    for name in named:
        assert (jobs / name.removeprefix("jobs/")).is_file(), f"docs/cloud.md names {name}, which does not exist"
