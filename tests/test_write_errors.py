"""A write the file system refuses (read-only, no permission) is one line naming the real path, from
every stage and from inside a Ray worker; files get the mode a plain open() gives."""

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
def test_a_checkpoint_on_a_read_only_disk_is_named(read_only):
    """Its first write (the folder it is written in) already fails: nothing else of the run is needed."""
    from types import SimpleNamespace

    from stages.core import checkpoint

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

    from stages.core.shard_writer import shard_name

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
def test_pipeline_prints_a_ray_workers_refused_write_in_one_line(ray_session, monkeypatch, capsys):
    import ray

    @ray.remote
    def raw():
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), "/o/x.png")

    error = _caught(raw.remote())

    def command(argv):
        raise error

    monkeypatch.setitem(pipeline.COMMANDS, "inspect", command)
    assert pipeline.main(["inspect", "x"]) == 2
    assert capsys.readouterr().err == "error: cannot write /o/x.png: read-only file system\n"


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
    return code, out, [line for line in err.splitlines() if line.strip()]


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
