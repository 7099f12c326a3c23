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


# --- the command line: every bad argument is one line, before Ray is asked ----------------------------


@pytest.fixture
def no_ray(monkeypatch):
    """submit must fail on its arguments before it connects: connecting is an error here."""
    import stages.submit

    def connect(address, source):
        raise AssertionError(f"connected to {address}")

    monkeypatch.setattr(stages.submit, "connect", connect)


@pytest.mark.parametrize("address", ["notaurl", "127.0.0.1:8265", "http://", "http://head:port", "ftp://head:8265",
                                     "http//head:8265"])
def test_a_malformed_address_is_one_line_naming_a_valid_one(address, tmp_path, no_ray, capsys):
    import pipeline

    assert pipeline.main(["submit", spec_file(tmp_path), "--address", address]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --address {address!r} is not a Ray dashboard address") and err.count("\n") == 1
    assert "http://HOST:8265" in err and "Traceback" not in err


@pytest.mark.parametrize("address", ["http://10.0.0.1:8265", "https://ray.example.com/dashboard", "ray://head:10001",
                                     "http://head"])
def test_well_formed_addresses_pass(address):
    from stages.submit import check_address

    assert check_address(address) == address


@pytest.mark.parametrize("argv,message", [
    (["--timeout", "0", "--wait"], "--timeout: must be a positive number of seconds, got 0"),
    (["--timeout", "nan", "--wait"], "--timeout: must be a positive number of seconds, got nan"),
    (["--timeout", "soon", "--wait"], "argument --timeout: invalid float value: 'soon'"),
    (["--timeout", "60"], "--timeout needs --wait"),
    (["--data", "s3://b/prefs"], "flags for the job go after `--`"),
])
def test_bad_submit_arguments_are_one_line(argv, message, tmp_path, no_ray, capsys):
    import pipeline

    with pytest.raises(SystemExit) as exited:  # argparse's usage errors, one line each
        pipeline.main(["submit", spec_file(tmp_path), *argv])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


class Following(Client):
    """A submitted job that runs until the user presses Ctrl-C."""

    def get_job_status(self, job_id):
        raise KeyboardInterrupt


def test_ctrl_c_while_waiting_names_the_job_that_keeps_running(tmp_path, monkeypatch, capsys):
    import pipeline
    import stages.submit

    monkeypatch.setattr(stages.submit, "connect", lambda address, source: Following())
    assert pipeline.main(["submit", spec_file(tmp_path, submission_id="job-7"), "--address", "http://h:8265",
                          "--wait"]) == 130
    err = capsys.readouterr().err
    assert "stopped following job-7: it keeps running on the cluster" in err and "ray job stop job-7" in err
    assert "Traceback" not in err


class Refusing(Client):
    def submit_job(self, **kwargs):
        raise RuntimeError("Request failed with status code 400: runtime_env: working_dir is too large.\n(more)")


def test_a_refused_submission_is_one_line_naming_the_dashboard(tmp_path, monkeypatch, capsys):
    import pipeline
    import stages.submit

    monkeypatch.setattr(stages.submit, "connect", lambda address, source: Refusing())
    assert pipeline.main(["submit", spec_file(tmp_path), "--address", "http://h:8265"]) == 2
    err = capsys.readouterr().err
    assert err == ("error: the Ray dashboard at http://h:8265 (--address) refused the job: Request failed with status "
                   "code 400: runtime_env: working_dir is too large.\n")


def test_the_given_address_wins_over_the_environment(monkeypatch):
    """Ray's client takes $RAY_API_SERVER_ADDRESS or $RAY_ADDRESS over the address it is given; the
    --address a user types is the one used (and printed)."""
    import ray.job_submission
    from ray.dashboard.utils import get_address_for_submission_client

    from stages.submit import connect

    class Recording:
        def __init__(self, address):
            self.address = get_address_for_submission_client(address)

    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", Recording)
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://elsewhere:8265")
    monkeypatch.setenv("RAY_ADDRESS", "http://elsewhere-too:8265")
    assert connect("http://mine:8265", "--address").address == "http://mine:8265"
    assert connect("http://elsewhere:8265", "$RAY_API_SERVER_ADDRESS").address == "http://elsewhere:8265"


def test_the_default_address_is_the_one_ray_uses(monkeypatch):
    from stages.submit import resolve_address

    for var in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    assert resolve_address(None) == ("http://127.0.0.1:8265", "the default")
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    assert resolve_address(None) == ("auto", "$RAY_ADDRESS")
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://head:8265")
    assert resolve_address(None) == ("http://head:8265", "$RAY_API_SERVER_ADDRESS")
    assert resolve_address("http://mine:8265") == ("http://mine:8265", "--address")
