"""Past one device: DDP and FSDP2 workers reproduce one worker, LoRA trains only its adapters,
sharded checkpoints resume exactly and across worker counts, SIGTERM and dead workers are survived.

Multi-worker runs here use gloo on CPU: two processes started with torch.multiprocessing (as
torchrun would), or Ray Train where the Ray path itself is under test.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT

from stages import train
from stages.core.config.options import TrainConfig
from stages.core.training import checkpoint
from stages.core.training.metrics import read
from stages.core.training.run_folder import prepare_output
from stages.core.training.trainer import train_loop

pytestmark = pytest.mark.slow

# float32 on CPU: the sums over workers differ from one process's only in rounding order.
TOL = dict(rel=1e-4, abs=1e-6)


def cfg_for(refs, out, **kw) -> TrainConfig:
    base = dict(refs=str(refs), output=str(out), batch_size=4, micro_batch_size=2, learning_rate=1e-3,
                shuffle_buffer=6, progress=False, seed=3, max_steps=3, warmup_ratio=0.0)
    return TrainConfig(**{**base, **kw})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, jobs: list[tuple]) -> None:
    """One of `world` gloo processes: runs each job in turn in the same process group (a training run, or
    `_save_sharded`), as torchrun would start each run's processes."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    for job, arg, resume_from in jobs:
        if job == "train":
            train_loop(arg, resume_from)
        else:
            _save_sharded(rank, world, arg)
        dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # an FSDP2 process can abort in its exit handlers (see FACTS); the work is done


def spawn_jobs(jobs: list[tuple[str, object]], world: int) -> None:
    """`world` gloo processes (started once: each is a fresh interpreter importing torch and transformers,
    seconds of CPU) that run the jobs one after another: ("train", TrainConfig) or ("tied", folder). A
    training run's output is settled (resume or start over) here first, in its turn, as the CLI would."""
    import torch.multiprocessing as mp

    settled = [(job, arg, prepare_output(arg) if job == "train" else None) for job, arg in jobs]
    mp.start_processes(_worker, args=(world, _free_port(), settled), nprocs=world, start_method="spawn")


def spawn_train(cfg: TrainConfig, world: int) -> dict:
    """`world` gloo processes running the training loop, as torchrun would start them."""
    spawn_jobs([("train", cfg)], world)
    return read(str(Path(cfg.output) / "metrics.jsonl"))


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def assert_same_run(a: Path, b: Path, keys=("loss", "rewards/margins", "logps/chosen", "grad_norm")) -> None:
    ra, rb = read(str(a / "metrics.jsonl")), read(str(b / "metrics.jsonl"))
    assert [r["step"] for r in ra] == [r["step"] for r in rb]
    for x, y in zip(ra, rb):
        for key in keys:
            assert y[key] == pytest.approx(x[key], **TOL), (x["step"], key)
    wa, wb = weights(a / "final"), weights(b / "final")
    assert wa.keys() == wb.keys()
    # AdamW divides by sqrt(v): where a gradient is near zero (embedding rows of rare tokens) the
    # rounding of the worker sum can move an entry by a fraction of the learning rate (1e-3 here).
    # Everything else agrees to 1e-6.
    far = sum(int(((wa[k] - wb[k]).abs() > 1e-6).sum()) for k in wa)
    assert far <= 1e-4 * sum(v.numel() for v in wa.values()), far
    assert max(float((wa[k] - wb[k]).abs().max()) for k in wa) < 5e-4


# All weights: a cosine schedule and a sharded checkpoint at step 2, so that the runs stopped at step
# 2 and resumed (on another number of workers) are held to the same uninterrupted run.
FULL = dict(save_every=2, lr_scheduler="cosine")
LORA = dict(lora_r=4, lora_alpha=8.0, learning_rate=1e-2)


@pytest.fixture(scope="module")
def runs(refs, tiny_model_dir, tmp_path_factory) -> dict:
    """The single-process runs the multi-worker runs are held to, then every two-process (gloo) run of this
    module in one spawn of two processes (DDP and FSDP2, all weights and LoRA; FSDP2 with bf16; FSDP2
    stopped at step 2; FSDP2 going on from one worker's step 2; FSDP2 saving a tied model). The name of
    each run -> its folder; "summary": the single-process summary of the "full" run."""
    root = tmp_path_factory.mktemp("runs")
    p = {name: root / name for name in ("full", "lora", "bf16", "one-two", "two-one", "bf16-fsdp", "tied-two")}
    p["summary"] = train.run(cfg_for(refs, p["full"], **FULL))
    # the LoRA run of test_lora_trains_only_adapters_and_final_is_merged too: a relative base model, which
    # the adapter's config writes down absolute
    train.run(cfg_for(refs, p["lora"], save_every=3, model=os.path.relpath(tiny_model_dir), **LORA))
    train.run(cfg_for(refs, p["bf16"], dtype="bfloat16"))
    train.run(cfg_for(refs, p["one-two"], stop_at_step=2, **FULL))  # 1 worker stops at 2; 2 finish it below
    jobs = []
    for strategy in ("ddp", "fsdp"):
        for kind, kw in (("full", FULL), ("lora", LORA)):
            p[f"{strategy}-{kind}"] = root / f"{strategy}-{kind}"
            jobs.append(("train", cfg_for(refs, p[f"{strategy}-{kind}"], strategy=strategy, **kw)))
    jobs += [("train", cfg_for(refs, p["bf16-fsdp"], dtype="bfloat16", strategy="fsdp")),
             ("train", cfg_for(refs, p["two-one"], strategy="fsdp", stop_at_step=2, **FULL)),
             ("train", cfg_for(refs, p["one-two"], strategy="fsdp", resume="true", **FULL)),
             ("tied", str(p["tied-two"]))]
    spawn_jobs(jobs, 2)
    return p


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("kind", ["full", "lora"])
def test_two_workers_reproduce_one(runs, strategy, kind):
    assert_same_run(runs[kind], runs[f"{strategy}-{kind}"])


def test_fsdp_mixed_precision_follows_bf16_autocast(runs):
    """--dtype bfloat16: FSDP2 gathers bf16 parameters and reduces in fp32; one worker autocasts. The
    two differ by bf16 rounding only."""
    a, b = read(str(runs["bf16"] / "metrics.jsonl")), read(str(runs["bf16-fsdp"] / "metrics.jsonl"))
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        assert math.isfinite(y["loss"]) and y["loss"] == pytest.approx(x["loss"], abs=2e-3), x["step"]
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=2e-2), x["step"]


def test_sharded_checkpoint_resumes_across_worker_counts(refs, runs):
    """fsdp on 2 workers stops at step 2; 1 worker finishes it. 1 worker stops at 2; 2 finish it (in `runs`).
    Both end where an uninterrupted single worker ends."""
    state = runs["two-one"] / "checkpoints" / "step-2" / "state"
    assert {p.name for p in state.iterdir()} >= {".metadata", "__0_0.distcp", "__1_0.distcp"}  # one part a worker
    train.run(cfg_for(refs, runs["two-one"], resume="true", **FULL))
    assert_same_run(runs["full"], runs["two-one"])
    assert_same_run(runs["full"], runs["one-two"])


def test_lora_trains_only_adapters_and_final_is_merged(refs, tmp_path, tiny_model_dir, runs):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from stages.core.scoring.logprobs import sequence_logps

    out = runs["lora"]  # 3 steps, a checkpoint at the last
    records = read(str(out / "metrics.jsonl"))
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert records[-1]["loss"] != records[0]["loss"]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    merged = AutoModelForCausalLM.from_pretrained(out / "final")  # plain transformers, no peft
    changed = [k for k, v in merged.state_dict().items() if not torch.equal(v, base.state_dict()[k])]
    assert changed and all("proj" in k for k in changed)  # the adapted linears, through their merged update
    base_path = json.loads((out / "final" / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert os.path.isabs(base_path)  # the folder loads from anywhere
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out / "final" / "adapter")
    assert [n for n, _ in adapter.named_parameters() if "lora_" in n]
    ids = torch.randint(0, merged.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    mask, comp = torch.ones_like(ids), torch.cat([torch.zeros(2, 4), torch.ones(2, 8)], 1).long()
    with torch.no_grad():
        a = sequence_logps(merged, ids, mask, comp)
        b = sequence_logps(adapter.get_base_model(), ids, mask, comp)  # the model with adapters inside
        c = sequence_logps(checkpoint.load_policy_model(str(out / "final" / "adapter")), ids, mask, comp)
        d = sequence_logps(checkpoint.load_policy_model(str(out / "checkpoints" / "step-3")), ids, mask, comp)
    assert torch.allclose(a, b, atol=1e-4) and torch.allclose(a, c, atol=1e-4) and torch.allclose(a, d, atol=1e-4)
    # eval takes the merged model, the adapter folder and the checkpoint alike
    from stages import evaluate
    from stages.core.config.options import EvalConfig

    losses = [evaluate.run(EvalConfig(refs=str(refs), model=str(m), output=str(tmp_path / f"eval-{i}"),
                                      progress=False))["eval/loss"]
              for i, m in enumerate([out / "final", out / "final" / "adapter", out / "checkpoints" / "step-3"])]
    assert losses[1] == pytest.approx(losses[0], abs=1e-5) and losses[2] == pytest.approx(losses[0], abs=1e-5)
    # The checkpoint holds the adapters and their AdamW state, not the frozen base.
    size = sum(f.stat().st_size for f in (out / "checkpoints" / "step-3" / "state").iterdir())
    assert size < 0.5 * (out / "final" / "model.safetensors").stat().st_size


def test_a_checkpoint_of_another_kind_is_refused(refs, tmp_path, runs):
    out = tmp_path / "lora"
    shutil.copytree(runs["lora"] / "checkpoints", out / "checkpoints")  # a LoRA checkpoint (step 3)
    with pytest.raises(checkpoint.CheckpointError, match="written with LoRA; this run is without it"):
        train.run(cfg_for(refs, out, resume="true"))


# The runs stopped by SIGTERM: long enough that the signal, sent after step 2 or 3, lands before the end (under
# Ray Train the workers hear of it a step or two later: 8).
STEPS, RAY_STEPS = 6, 8


def _train_command(refs, out, *extra, steps: int = STEPS) -> list[str]:
    return [sys.executable, str(ROOT / "pipeline.py"), "train", "--refs", str(refs), "--output", str(out),
            "--batch-size", "4", "--micro-batch-size", "2", "--learning-rate", "1e-3", "--shuffle-buffer", "6",
            "--seed", "3", "--max-steps", str(steps), "--warmup-ratio", "0", "--progress", "false", *extra]


def _wait_for_steps(out: Path, n: int, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        metrics = out / "metrics.jsonl"
        if metrics.exists() and len(metrics.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError(f"no {n} steps in {timeout} s")


def _signalled(cmd: list[str], out: Path, steps: int, signals: list, wait: float, timeout: float) -> dict:
    """A CLI run started now, and a thread that sends it `signals` once it has `steps` steps (waiting up to
    `wait` s) and then waits up to `timeout` s for its end: the run goes on while other tests run. The
    result: "out", "proc", "thread"; once the thread is done "err" (the run's stderr) or "error" (what went
    wrong, as the test would have raised it). stdout to /dev/null: not into another test's captured output."""
    import threading

    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    result: dict = {"out": out, "proc": proc}

    def stop_it():
        try:
            _wait_for_steps(out, steps, proc, timeout=wait)
            for sig in signals:
                proc.send_signal(sig)
            _, result["err"] = proc.communicate(timeout=timeout)
        except BaseException as e:  # the test reports it
            result["error"] = repr(e)

    result["thread"] = threading.Thread(target=stop_it, daemon=True)
    result["thread"].start()
    return result


def _ended(run: dict) -> str:
    """The stderr of a `_signalled` run, once it has ended."""
    run["thread"].join(timeout=600)
    assert not run["thread"].is_alive() and "error" not in run, run.get("error")
    return run["err"]


def _not_left_running(*runs: dict) -> None:
    for run in runs:
        if run["proc"].poll() is None:  # a test failed before the run's end
            run["proc"].kill()
            run["proc"].communicate()


@pytest.fixture(scope="module")
def sigterm_runs(refs, tmp_path_factory) -> dict:
    """The CLI runs of the two SIGTERM tests below (one SIGTERM after step 2; two at once after step 3), started
    together: each is one process that keeps about one core busy, and the machine may have two."""
    root = tmp_path_factory.mktemp("sigterm")
    runs = {"once": _signalled(_train_command(refs, root / "pre"), root / "pre", 2, [signal.SIGTERM], 180, 120),
            "twice": _signalled(_train_command(refs, root / "twice", "--save-every", "1"), root / "twice", 3,
                                [signal.SIGTERM, signal.SIGTERM], 180, 120)}
    yield runs
    _not_left_running(*runs.values())


@pytest.fixture(scope="module")
def whole(refs, tmp_path_factory) -> Path:
    """One uninterrupted single-process run of _train_command's steps: what a run stopped by SIGTERM
    (once or twice) and resumed must end with, bit for bit."""
    out = tmp_path_factory.mktemp("whole") / "run"
    train.run(cfg_for(refs, out, max_steps=STEPS))
    return out


def test_sigterm_checkpoints_and_resume_auto_continues(refs, sigterm_runs, whole):
    out, proc = sigterm_runs["once"]["out"], sigterm_runs["once"]["proc"]  # SIGTERMed after its step 2
    err = _ended(sigterm_runs["once"])
    assert proc.returncode == 143, err
    assert "preempted (SIGTERM) at step" in err and "--resume auto" in err
    step = checkpoint.step_of(Path(checkpoint.latest(str(out))).name)
    assert 2 <= step < STEPS
    # the resume is no process's behaviour: in this process (the CLI's exit code 0: test_errors, test_cli)
    assert train.run(cfg_for(refs, out, max_steps=STEPS, resume="auto"))["outcome"] == "finished"
    steps = [r["step"] for r in read(str(out / "metrics.jsonl"))]
    assert steps == list(range(1, STEPS + 1))  # each step once
    wa, wb = weights(whole / "final"), weights(out / "final")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def _ray_train_workers(other: subprocess.Popen | None = None) -> list:
    """The Ray Train workers of this process's Ray (never those of another session on the machine, nor those of
    the Ray of `other`, a CLI run started by this process: its own Ray, its own workers)."""
    import psutil

    def cmdline(p) -> list[str]:
        try:
            return p.cmdline()
        except psutil.Error:  # ended since it was listed
            return []

    theirs = set()
    if other is not None:
        try:
            theirs = {c.pid for c in psutil.Process(other.pid).children(recursive=True)}
        except psutil.Error:  # it has ended, and its Ray with it
            pass
    return [p for p in psutil.Process().children(recursive=True)
            if p.pid not in theirs and any("RayTrainWorker" in c for c in cmdline(p))]


@pytest.fixture(scope="module")
def ray_pre(refs, tmp_path_factory) -> dict:
    """The CLI run of test_sigterm_to_the_driver_of_ray_train_workers (FSDP2 on two Ray Train workers, its own
    Ray), SIGTERMed after its step 2: started here so that it runs while the in-process Ray Train run of
    test_fsdp_on_ray_train_workers_one_killed_and_restarted_from_the_checkpoint does; each spends much of its
    time waiting (Ray's start, its workers' imports, the controller's polls)."""
    out = tmp_path_factory.mktemp("ray-pre") / "run"
    run = _signalled(_train_command(refs, out, "--num-workers", "2", "--strategy", "fsdp", steps=RAY_STEPS), out, 2,
                     [signal.SIGTERM], 240, 240)
    yield run
    _not_left_running(run)


def test_fsdp_on_ray_train_workers_one_killed_and_restarted_from_the_checkpoint(refs, tmp_path, runs, capfd,
                                                                                 ray_session, ray_pre):
    """FSDP2 on two Ray Train workers, the driver in this process (a SIGKILL to one of its workers is the point,
    not the driver's process): a thread kills a worker once the first checkpoint is there; Ray Train starts
    the group again, which goes on from that checkpoint. The run still ends where one worker ends."""
    import threading

    out = tmp_path / "ray"
    killed: list = []

    def kill_a_worker():
        deadline = time.time() + 240
        while checkpoint.latest(str(out)) is None and time.time() < deadline:
            time.sleep(0.1)
        victims = _ray_train_workers(other=ray_pre["proc"])
        if victims:
            os.kill(victims[-1].pid, signal.SIGKILL)
        killed.append(len(victims))

    killer = threading.Thread(target=kill_a_worker, daemon=True)
    capfd.readouterr()
    killer.start()
    # a checkpoint every step (FULL's every 2, numerically the same run): the kill comes after step 1's
    summary = train.run(cfg_for(refs, out, strategy="fsdp", num_workers=2, max_failures=1, **{**FULL, "save_every": 1}))
    killer.join(timeout=60)
    assert killed and killed[0], "no Ray Train worker process found"
    one = runs["summary"]  # the summary of the in-process path
    assert summary.keys() == one.keys() and summary["outcome"] == "finished"  # one shape for both paths
    err = ""
    for _ in range(50):  # the controller's log lines reach this process's stderr a moment later
        err += capfd.readouterr().err
        if err.count("Started training worker group") >= 2:
            break
        time.sleep(0.2)
    assert err.count("Started training worker group") == 2, err[-3000:]  # the group was started again
    assert [r["step"] for r in read(str(out / "metrics.jsonl"))] == [1, 2, 3]  # each step once
    assert_same_run(runs["full"], out)


def test_sigterm_to_the_driver_of_ray_train_workers(refs, ray_pre):
    """Under Ray Train the driver takes the signal; the workers finish the step, checkpoint, stop. (The run,
    SIGTERMed after its step 2: started in `ray_pre`.)"""
    out, proc = ray_pre["out"], ray_pre["proc"]
    err = _ended(ray_pre)
    assert proc.returncode == 143, err[-3000:]
    last = checkpoint.latest(str(out))
    assert last is not None and checkpoint.step_of(Path(last).name) >= 2
    # one worker, in this process, goes on from the two workers' sharded checkpoint
    assert train.run(cfg_for(refs, out, max_steps=RAY_STEPS, resume="auto"))["outcome"] == "finished"
    assert [r["step"] for r in read(str(out / "metrics.jsonl"))] == list(range(1, RAY_STEPS + 1))


def test_second_sigterm_stops_at_once_and_keeps_the_last_checkpoint(refs, sigterm_runs, whole):
    out, proc = sigterm_runs["twice"]["out"], sigterm_runs["twice"]["proc"]  # two SIGTERMs at once after step 3
    _ended(sigterm_runs["twice"])
    assert proc.returncode != 0
    last = checkpoint.latest(str(out))
    assert last is not None and (Path(last) / "state" / ".metadata").exists()
    summary = train.run(cfg_for(refs, out, max_steps=STEPS, save_every=1, resume="auto"))
    assert summary["outcome"] == "finished"
    assert [r["step"] for r in read(str(out / "metrics.jsonl"))] == list(range(1, STEPS + 1))
    wa, wb = weights(whole / "final"), weights(out / "final")  # the intact checkpoint resumed exactly
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def _tied_llama():
    """A tiny Llama whose LM head is its embedding matrix (`tie_word_embeddings`, as SmolLM2)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def _save_sharded(rank: int, world: int, folder: str) -> None:
    """In a gloo process of `_worker`: the tied model under FSDP2, saved as the trainer's save_weights does."""
    from stages.core.training import parallel

    model = _tied_llama()
    parallel.wrap(model, "fsdp", world, "float32")
    state = parallel.full_state_dict(model)  # what the trainer's save_weights writes
    if rank == 0:
        model.save_pretrained(folder, state_dict=state, safe_serialization=True)


def test_fsdp_final_of_tied_embeddings_stores_the_matrix_once(tmp_path, runs):
    """A tied model's `final/` under FSDP2 holds the embedding matrix once, as one worker's does (a
    second copy is ~1 GB in float32 at a 128k vocabulary), and loads back to the same logits. (The two
    workers' save: in `runs`.)"""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    one = _tied_llama()
    one.save_pretrained(tmp_path / "one")
    folders = {"one": tmp_path / "one", "two": runs["tied-two"]}
    keys = {}
    for name, folder in folders.items():
        with safe_open(folder / "model.safetensors", "pt") as f:
            keys[name] = set(f.keys())
    assert "lm_head.weight" not in keys["two"] and keys["two"] == keys["one"]
    size = {name: (folder / "model.safetensors").stat().st_size for name, folder in folders.items()}
    assert size["two"] == pytest.approx(size["one"], rel=0.01)
    loaded = AutoModelForCausalLM.from_pretrained(folders["two"]).eval()
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # tied again on load
    ids = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, one(ids).logits, atol=1e-6)
