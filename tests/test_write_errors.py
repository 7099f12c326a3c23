"""A write the file system refuses (read-only, no permission) is one line naming the real path, from
every stage and from inside a Ray worker; files get the mode a plain open() gives; the plots keep
their labels inside the picture and their tick labels apart."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from pathlib import Path

import pytest

import pipeline
from stages.core import storage
from stages.core.storage import StorageError, write_refused

HEX = "0123456789abcdef" * 2


def _rofs(path: Path) -> OSError:
    return OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))


# --- naming: the file the user knows, never a temporary one -------------------------------------------------

@pytest.mark.parametrize("filename,named", [
    ("/o/x.json", "/o/x.json"),
    (f"/o/.x.json.{HEX}.partial", "/o/x.json"),  # write_bytes_atomic's temporary file
    ("/o/checkpoints/.step-2.partial/rng-0.pt", "/o/checkpoints/step-2/rng-0.pt"),  # a checkpoint being written
    ("/o/final/.tmpAb3xYz", "/o/final"),  # safetensors' (Rust tempfile's) temporary file
    ("/o/final/tmpk2j4_x9a", "/o/final"),  # Python's tempfile
])
def test_a_refused_write_names_the_real_file(filename, named):
    refused = write_refused(OSError(errno.EROFS, "Read-only file system", filename), "/o/given")
    assert str(refused) == f"cannot write {named}: read-only file system"


def test_a_refused_write_without_a_file_name_names_the_given_path():
    assert str(write_refused(OSError(errno.EACCES, "Permission denied"), "/o/x")) == \
        "cannot write /o/x: permission denied"


def test_a_permission_error_off_the_written_path_is_not_called_a_write():
    """Train writes its output inside one `local_write(OUTPUT)` block, and reads its refs there too."""
    def denied(name):
        return PermissionError(errno.EACCES, "Permission denied", name)

    assert str(write_refused(denied("/refs/shards/a.parquet"), "/out")) == \
        "cannot access /refs/shards/a.parquet: permission denied"
    assert str(write_refused(denied("/out/final/x"), "/out")) == "cannot write /out/final/x: permission denied"
    assert str(write_refused(denied("/out"), "/out/_lease.json")) == "cannot write /out: permission denied"


def test_a_permission_error_of_unknown_kind_is_not_called_a_write():
    """pipeline.py passes no path: the error may come from a read (an input the user may not read)."""
    assert str(write_refused(PermissionError(errno.EACCES, "Permission denied", "/data/in.jsonl"))) == \
        "cannot access /data/in.jsonl: permission denied"
    assert str(write_refused(_rofs(Path("/o/x.png")))) == "cannot write /o/x.png: read-only file system"
    assert write_refused(FileNotFoundError(errno.ENOENT, "No such file", "/x")) is None


def test_permission_denied_in_an_atomic_write_names_the_file(tmp_path, monkeypatch):
    """As root, chmod stops nothing: the refusal is simulated where the temporary file is opened."""
    def refused(path, mode="r", *args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)

    monkeypatch.setattr(storage, "open", refused, raising=False)
    with pytest.raises(StorageError, match=f"^cannot write {tmp_path}/x.json: permission denied$"):
        storage.write_json(str(tmp_path / "x.json"), {})
    assert list(tmp_path.iterdir()) == []


# --- a read-only file system ----------------------------------------------------------------------------------

def _mount_read_only(folder: Path, source: Path | None = None) -> Path:
    """A tmpfs at `folder` holding a copy of `source`, then made read-only; skips where mount is refused."""
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(folder)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    if source is not None:
        shutil.copytree(source, folder / source.name)
    subprocess.run(["mount", "-o", "remount,ro", str(folder)], check=True)
    return folder


@pytest.fixture
def read_only(tmp_path):
    folder = _mount_read_only(tmp_path / "ro")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.mark.slow
def test_every_storage_write_on_a_read_only_disk_is_named(read_only, tmp_path):
    src = tmp_path / "src.txt"
    src.write_text("x")
    cases = [(lambda: storage.write_bytes_atomic(str(read_only / "x.json"), b"{}"), read_only / "x.json"),
             (lambda: storage.write_json(str(read_only / "new" / "x.json"), {}), read_only / "new"),
             (lambda: storage.upload(str(src), str(read_only / "up.txt")), read_only / "up.txt"),
             (lambda: storage.download(str(src), str(read_only / "down" / "x.txt")), read_only / "down")]
    for write, named in cases:
        with pytest.raises(StorageError) as caught:
            write()
        assert str(caught.value) == f"cannot write {named}: read-only file system"


@pytest.mark.slow
def test_removing_on_a_read_only_disk_is_named(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / f".x.json.{HEX}.partial").write_text("half")
    (out / "old.json").write_text("{}")
    ro = _mount_read_only(tmp_path / "ro", out)
    try:
        with pytest.raises(StorageError, match=f"^cannot write {ro}/out/x.json: read-only file system$"):
            storage.remove_partials(str(ro / "out"))
        with pytest.raises(StorageError, match=f"^cannot write {ro}/out/old.json: read-only file system$"):
            storage.remove(str(ro / "out" / "old.json"))
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=False)


@pytest.mark.slow
def test_a_plot_on_a_read_only_disk_is_named(read_only):
    from stages.core.plots import margin_histogram

    with pytest.raises(StorageError, match=f"^cannot write {read_only}/m.png: read-only file system$"):
        margin_histogram([0.5, -1.0, 2.0], str(read_only / "m.png"), "margins")


@pytest.mark.slow
def test_a_checkpoint_on_a_read_only_disk_is_named(read_only):
    """Its first write (the folder it is written in) already fails: nothing else of the run is needed."""
    from types import SimpleNamespace

    from stages.core.training import checkpoint

    group = SimpleNamespace(rank=0, on=False, barrier=lambda: None)
    out = str(read_only / "run")
    with pytest.raises(StorageError, match=f"^cannot write {out}: read-only file system$"):
        checkpoint.save(out, out, 1, None, {}, 1, group)


# --- inside a Ray worker ---------------------------------------------------------------------------------------

def _caught(ref) -> BaseException:
    import ray

    with pytest.raises(Exception) as caught:
        ray.get(ref)
    return caught.value


@pytest.mark.slow
def test_a_write_refused_in_a_ray_worker_is_one_line(ray_session, read_only):
    """A raw OSError from a task, and a StorageError from an actor's own write (precompute's shard
    writers) reached through another task (precompute's `deliver`), come out as the one line."""
    import ray

    from stages.core.refs.writer import shard_name

    @ray.remote
    def raw(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)

    @ray.remote
    class Writer:
        def write(self, path):
            storage.write_bytes_atomic(path, b"shard")

    @ray.remote
    def deliver(writer, path):
        return ray.get(writer.write.remote(path))

    shard = f"{read_only}/shards/{shard_name(0)}.parquet"
    writer = Writer.remote()
    for ref, named in ((raw.remote(f"{read_only}/.x.json.{HEX}.partial"), f"{read_only}/x.json"),
                       (writer.write.remote(f"{read_only}/x.json"), f"{read_only}/x.json"),
                       (deliver.remote(writer, shard), f"{read_only}/shards")):
        refused = write_refused(_caught(ref))
        assert type(refused) is StorageError and str(refused) == f"cannot write {named}: read-only file system"


@pytest.mark.slow
@pytest.mark.parametrize("raised,line", [
    (OSError(errno.EROFS, os.strerror(errno.EROFS), "/o/x.png"),
     "error: cannot write /o/x.png: read-only file system\n"),
    # A PipelineError raised in a Ray task reaches the user as its own line, not Ray's remote traceback.
    (StorageError("cannot read s3://b/x: access denied"), "error: cannot read s3://b/x: access denied\n"),
])
def test_pipeline_prints_a_ray_workers_error_in_one_line(ray_session, monkeypatch, capsys, raised, line):
    import ray

    @ray.remote
    def fail():
        raise raised

    error = _caught(fail.remote())

    def command(argv):
        raise error

    monkeypatch.setitem(pipeline.COMMANDS, "inspect", command)
    assert pipeline.main(["inspect", "x"]) == 2
    assert capsys.readouterr().err == line


# --- every stage, through the CLI, on a read-only disk -----------------------------------------------------------

@pytest.fixture(scope="module")
def ro_refs(refs, tmp_path_factory):
    """A read-only tmpfs holding a copy of the session's refs (an output a user cannot write)."""
    folder = _mount_read_only(tmp_path_factory.mktemp("read-only") / "disk", refs)
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


def _cli(capsys, *argv: str) -> tuple[int, str, list[str]]:
    capsys.readouterr()
    code = pipeline.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, [line for line in err.splitlines() if line.strip() and not line.startswith("device: ")]


@pytest.mark.slow
def test_precompute_into_a_read_only_disk(refs, ro_refs, tiny_model_dir, capsys):
    data = str(refs.parent / "in.jsonl")
    common = ["--data", data, "--model", tiny_model_dir, "--format", "hh", "--rows-per-shard", "5",
              "--max-length", "256", "--progress", "false"]
    code, _, err = _cli(capsys, "precompute", *common, "--output", str(ro_refs / "new"))
    assert (code, err) == (2, [f"error: cannot write {ro_refs}/new: read-only file system"])
    # A finished output, run again (the run's lease is its first write).
    code, _, err = _cli(capsys, "precompute", *common, "--output", str(ro_refs / "refs"))
    assert (code, err) == (2, [f"error: cannot write {ro_refs}/refs/_lease.json: read-only file system"])


@pytest.mark.slow
def test_train_into_a_read_only_disk(refs, ro_refs, capsys):
    code, _, err = _cli(capsys, "train", "--refs", str(ro_refs / "refs"), "--output", str(ro_refs / "run"),
                        "--max-steps", "1", "--batch-size", "2", "--progress", "false")
    assert (code, err) == (2, [f"error: cannot write {ro_refs}/run: read-only file system"])


@pytest.mark.slow
def test_inspect_a_read_only_output(ro_refs, capsys):
    """The report is printed; the histogram beside it cannot be written."""
    code, out, err = _cli(capsys, "inspect", str(ro_refs / "refs"))
    assert (code, err) == (2, [f"error: cannot write {ro_refs}/refs/ref_margins.png: read-only file system"])
    assert "pairs" in out
    assert not (ro_refs / "refs" / "ref_margins.png").exists()


# --- modes: what a plain open() gives -----------------------------------------------------------------------------

@pytest.fixture
def umask_027():
    """An unusual umask, so that a mode the test expects cannot be 0644 by chance."""
    old = os.umask(0o027)
    yield 0o640
    os.umask(old)


def _mode(path) -> int:
    return os.stat(path).st_mode & 0o777


def test_atomic_writes_have_the_mode_of_a_plain_open(tmp_path, umask_027):
    storage.write_bytes_atomic(str(tmp_path / "a.json"), b"{}")
    with open(tmp_path / "plain.json", "wb") as fh:
        fh.write(b"{}")
    assert _mode(tmp_path / "a.json") == _mode(tmp_path / "plain.json") == umask_027


def test_a_safetensors_file_gets_the_mode_of_a_plain_open(tmp_path, umask_027):
    """safetensors writes through a temporary file (mode 0600) and renames it: `plain_modes` gives
    the files of a folder written that way (final/, best/) the mode everyone else's files have."""
    import torch
    from safetensors.torch import save_file

    folder = tmp_path / "final"
    folder.mkdir()
    save_file({"w": torch.zeros(2)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text("{}")
    os.chmod(folder / "config.json", 0o600)
    storage.plain_modes(str(folder))
    assert {p.name: _mode(p) for p in folder.iterdir()} == {"model.safetensors": 0o640, "config.json": 0o640}
    storage.plain_modes(str(folder / "model.safetensors"))  # a single file too
    assert _mode(folder / "model.safetensors") == 0o640


def test_a_plot_gets_the_mode_of_a_plain_open(tmp_path, umask_027):
    from stages.core.plots import margin_histogram

    margin_histogram([0.5, -1.0, 2.0], str(tmp_path / "m.png"), "margins")
    assert _mode(tmp_path / "m.png") == umask_027
    assert [p.name for p in tmp_path.iterdir()] == ["m.png"]  # written whole under its name, nothing else


# --- plots: nothing cut off, nothing on top of anything else -------------------------------------------------------

@pytest.fixture
def saved_figures(monkeypatch):
    """The figures the plots save, with the resolution they were saved at."""
    from matplotlib.figure import Figure

    figures, savefig = [], Figure.savefig

    def keep(fig, *args, **kwargs):
        figures.append((fig, kwargs.get("dpi")))
        return savefig(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    return figures


def _drawn_ticks(axis) -> list:
    lo, hi = sorted(axis.get_view_interval())
    return [t for loc, t in zip(axis.get_ticklocs(), axis.get_ticklabels()) if lo <= loc <= hi and t.get_text()]


def layout_problems(saved) -> list[str]:
    """Texts outside the figure, tick labels on top of each other, an axes' texts on another axes'.
    Drawn again as it was saved (a closed figure has lost its canvas)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig, dpi = saved
    if dpi:
        fig.set_dpi(dpi)
    FigureCanvasAgg(fig).draw()  # lays it out as saving did (a layout engine runs at draw time)
    renderer = fig.canvas.get_renderer()
    box = fig.bbox
    problems, texts = [], []
    for i, ax in enumerate(fig.axes):
        own = [ax.title, ax.xaxis.label, ax.yaxis.label, *ax.texts]
        for axis in (ax.xaxis, ax.yaxis):
            ticks = [(t.get_text(), t.get_window_extent(renderer)) for t in _drawn_ticks(axis)]
            own += _drawn_ticks(axis)
            problems += [f"axes {i}: {axis.axis_name} tick labels {a} and {b} overlap"
                         for (a, ea), (b, eb) in zip(ticks, ticks[1:]) if ea.overlaps(eb)]
        for text in own:
            if text.get_text() and text.get_visible():
                extent = text.get_window_extent(renderer)
                texts.append((i, text.get_text(), extent))
                if not (box.x0 <= extent.x0 and extent.x1 <= box.x1 and box.y0 <= extent.y0 and extent.y1 <= box.y1):
                    problems.append(f"axes {i}: {text.get_text()!r} is cut off")
    for k, (i, a, ea) in enumerate(texts):
        problems += [f"axes {i} {a!r} overlaps axes {j} {b!r}" for j, b, eb in texts[k + 1:]
                     if j != i and ea.overlaps(eb)]
        problems += [f"axes {i} {a!r} lies on axes {j}" for j, ax in enumerate(fig.axes)
                     if j != i and ea.overlaps(ax.bbox)]
    return problems


def _sweep_rows(kl: list[float]) -> list[dict]:
    return [{"beta": b, "eval/logratio/chosen": x, "eval/rewards/accuracies": a, "eval/rewards/margins": m}
            for b, x, a, m in zip([0.01, 0.05, 0.1, 0.5], kl, [0.5, 0.55, 0.6, 0.625], [0.001, 0.0123, 0.05, 0.2])]


@pytest.mark.parametrize("kl", [[-0.00012, -0.0041, -0.0123, -0.25], [0.001231, 0.001238, 0.001252, 0.001299],
                                [-1234.5, -5678.9, -12000.1, -40000.3]])
def test_sweep_plot_layout(tmp_path, saved_figures, kl):
    from stages.core.plots import sweep_tradeoff

    sweep_tradeoff(_sweep_rows(kl), str(tmp_path / "sweep.png"))
    assert layout_problems(saved_figures[-1]) == []


def test_training_curves_and_margins_layout(tmp_path, saved_figures):
    from stages.core.plots import margin_histogram, training_curves

    keys = ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected")
    records = [{"step": s, **{k: 0.693 - s * 1.234e-6 for k in keys}} for s in range(1000, 251001, 1000)]
    records += [{"step": s, **{f"eval/{k}": 0.6 for k in keys}} for s in (50000, 250000)]
    training_curves(records, str(tmp_path / "curves.png"), "dpo, beta 0.1, lr 5e-07")
    margin_histogram([1234.5678 + i * 0.001 for i in range(300)], str(tmp_path / "m.png"),
                     "reference margins, 300 pairs (HuggingFaceTB/SmolLM2-135M-Instruct)")
    assert [layout_problems(fig) for fig in saved_figures] == [[], []]


def test_iterate_rounds_plot_layout_keeps_whole_rounds(tmp_path, saved_figures):
    """iterate's plot puts a tick on every round: on many rounds they are thinned, still to whole rounds."""
    from stages.iterate import rounds_plot

    rows = [{"round": k, "accuracy": 0.5 + k / 100, "margin": k / 10, "kl": k * 1.5, "judge_score": None}
            for k in range(31)]
    rounds_plot(rows, str(tmp_path / "rounds.png"))
    assert layout_problems(saved_figures[-1]) == []
    fig, _ = saved_figures[-1]
    assert all(float(t).is_integer() for ax in fig.axes for t in ax.get_xticks())


@pytest.mark.slow
def test_a_trained_models_files_get_the_mode_of_a_plain_open(refs, tmp_path, umask_027):
    """final/model.safetensors is written by safetensors through a 0600 temporary file: readable by others."""
    from stages import train
    from stages.core.config.options import TrainConfig

    train.run(TrainConfig(refs=str(refs), output=str(tmp_path / "run"), max_steps=1, batch_size=2,
                          micro_batch_size=2, progress=False))
    final = tmp_path / "run" / "final"
    modes = {p.name: p.stat().st_mode & 0o777 for p in final.iterdir() if p.is_file()}
    assert modes["model.safetensors"] == umask_027 and set(modes.values()) == {umask_027}, modes
