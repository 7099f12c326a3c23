"""`pipeline.py submit`: what a spec may hold and what reaches Ray's JobSubmissionClient."""

from __future__ import annotations

import pytest
import yaml
from conftest import ROOT

from stages.submit import SUBMIT_KEYS, SubmitError, _submit, load_spec


def spec_file(tmp_path, **spec):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"entrypoint": "python pipeline.py precompute", **spec}))
    return str(path)


@pytest.mark.parametrize("name", ["AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "HF_TOKEN",
                                  "DB_PASSWORD", "MY_API_KEY"])
def test_credentials_in_runtime_env_are_refused(tmp_path, monkeypatch, name):
    monkeypatch.setenv(name, "value")
    path = spec_file(tmp_path, runtime_env={"env_vars": {name: f"${{{name}}}", "AWS_DEFAULT_REGION": "eu-west-1"}})
    with pytest.raises(SubmitError, match=rf"sets {name}: a job's runtime_env is readable .*Kubernetes Secret"):
        load_spec(path, [])


def test_settings_that_are_not_secret_pass_and_the_shipped_specs_load(tmp_path, monkeypatch):
    spec = load_spec(spec_file(tmp_path, runtime_env={"env_vars": {"AWS_ENDPOINT_URL": "http://s3:9000",
                                                                   "HF_HUB_OFFLINE": "1"}}), [])
    assert spec["runtime_env"]["env_vars"] == {"AWS_ENDPOINT_URL": "http://s3:9000", "HF_HUB_OFFLINE": "1"}
    values = {"precompute.yaml": ["--data", "s3://b/prefs", "--model", "org/m", "--output", "s3://b/refs"],
              "train.yaml": ["--refs", "s3://b/refs", "--output", "s3://b/run"],
              "nightly.yaml": ["--data", "s3://b/prefs", "--model", "org/m", "--refs", "s3://b/refs",
                               "--runs", "s3://b/runs"],
              "iterate.yaml": ["--prompts", "s3://b/p.jsonl", "--model", "org/m", "--reward-model", "org/rm",
                               "--output", "s3://b/online"]}
    assert sorted(values) == sorted(p.name for p in (ROOT / "jobs").glob("*.yaml"))
    for job, flags in values.items():
        entrypoint = load_spec(str(ROOT / "jobs" / job), ["--", *flags][1:])["entrypoint"]
        assert entrypoint.startswith("python pipeline.py") and entrypoint.endswith(" ".join(flags))
        with pytest.raises(SubmitError, match=rf"jobs/{job}: the entrypoint still holds {flags[-2]} "
                                              r"s3://YOUR_BUCKET/.*`pipeline.py submit .* -- "):
            load_spec(str(ROOT / "jobs" / job), flags[:-2])  # one example value left unreplaced


def test_unknown_keys_are_refused_by_name(tmp_path):
    with pytest.raises(SubmitError, match=r"unknown key\(s\) 'entrypoint_cpus', 'retries'"):
        load_spec(spec_file(tmp_path, entrypoint_cpus=1, retries=3), [])


class Client:
    """Records what submit_job gets; a second job with one submission_id is refused, as Ray does."""

    def __init__(self):
        self.jobs: dict[str, dict] = {}

    def submit_job(self, **kwargs):
        job = kwargs.get("submission_id") or f"raysubmit_{len(self.jobs)}"
        if job in self.jobs:
            raise RuntimeError(f"Request failed with status code 400: Job with submission_id {job} already exists. "
                               "Please use a different submission_id.")
        self.jobs[job] = kwargs
        return job


def test_every_key_a_spec_sets_reaches_submit_job_and_a_submission_id_makes_it_idempotent(tmp_path):
    values = {"submission_id": "nightly-2026-11-26", "entrypoint_num_cpus": 1, "entrypoint_num_gpus": 0,
              "entrypoint_memory": 2 << 30, "entrypoint_resources": {"head": 0.01},
              "entrypoint_label_selector": {"ray.io/node-group": "head"}, "metadata": {"stage": "nightly"}}
    spec = load_spec(spec_file(tmp_path, **values), [])
    client = Client()
    assert _submit(client, spec) == ("nightly-2026-11-26", True)
    assert _submit(client, spec) == ("nightly-2026-11-26", False)  # retried: the same job, not a second
    sent = client.jobs["nightly-2026-11-26"]
    assert set(sent) <= set(SUBMIT_KEYS) and {k: sent[k] for k in values} == values
    assert len(client.jobs) == 1
