"""Output folders held by one run at a time (``files.exclusive``), and what is removed."""

import pytest

from sparsekern.files import atomic_write, exclusive


def test_a_refused_run_leaves_the_holders_lock_and_folder(tmp_path):
    """A second run refused on a folder that holds only the first run's lock (it has
    written nothing yet) leaves the lock and the folder: a third run is refused too (the
    second removed them, and the third then ran beside the first)."""
    folder = tmp_path / "run"
    folder.mkdir()
    with exclusive(folder, made=True):
        for _ in range(2):
            with pytest.raises(ValueError, match="is in use by another run"):
                with exclusive(folder, made=True):
                    pass
            assert (folder / ".lock").is_file()


def test_only_atomic_writes_temporary_files_are_removed(tmp_path):
    """A killed writer's temporary file goes when the next run takes the folder; the
    user's own hidden .tmp files stay."""
    mine = [tmp_path / ".notes.tmp", tmp_path / ".backup.tmp"]
    for p in mine:
        p.write_text("keep")
    atomic_write(tmp_path / "metrics.json", lambda tmp: open(tmp, "w").write("{}"))
    stale = tmp_path / ".metrics.json.k9go123r.tmp"
    stale.write_text("half")
    (tmp_path / "a").mkdir()
    with exclusive(tmp_path):
        pass
    assert not stale.exists() and all(p.read_text() == "keep" for p in mine)
    assert (tmp_path / "metrics.json").read_text() == "{}"


def test_a_lock_that_is_a_folder_is_one_line(tmp_path):
    (tmp_path / ".lock").mkdir()
    with pytest.raises(ValueError, match="is not a file"):
        with exclusive(tmp_path):
            pass


def test_a_failed_write_is_one_oserror_and_keeps_the_previous_file(tmp_path):
    """torch.save on a full disk raises RuntimeError: an OSError naming the file, the
    previous file whole, no temporary file left."""
    path = tmp_path / "checkpoint.pt"
    atomic_write(path, lambda tmp: open(tmp, "w").write("previous"))

    def full_disk(tmp):
        open(tmp, "w").write("half")
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0")

    with pytest.raises(OSError, match=f"cannot write {path}: .*unexpected pos 64 vs 0 \\(disk full\\?\\)"):
        atomic_write(path, full_disk)
    assert path.read_text() == "previous" and [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_a_failed_write_names_the_disk_only_where_it_is_the_cause(tmp_path):
    import errno

    def fails(exc):
        def write(tmp):
            raise exc
        return write
    with pytest.raises(OSError, match=r"cannot write .*: no space left on the disk$"):
        atomic_write(tmp_path / "a", fails(OSError(errno.ENOSPC, "No space left on device")))
    with pytest.raises(OSError, match=r"cannot write .*: Could not export Python function call 'f'$"):
        atomic_write(tmp_path / "b", fails(RuntimeError("Could not export Python function call 'f'")))


def test_the_data_reach_the_disk_before_the_rename(tmp_path, monkeypatch):
    """A crash after the rename cannot leave an empty file in place of the previous one:
    the temporary file is synced before it replaces ``path``, the folder after."""
    import os

    import sparsekern.files as files

    calls = []
    sync, replace = os.fsync, os.replace
    monkeypatch.setattr(files.os, "fsync", lambda fd: calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or sync(fd))
    monkeypatch.setattr(files.os, "replace", lambda a, b: calls.append(("replace", str(b))) or replace(a, b))
    path = atomic_write(tmp_path / "metrics.json", lambda tmp: open(tmp, "w").write("{}"))
    assert [c[0] for c in calls] == ["fsync", "replace", "fsync"]
    assert calls[0][1].startswith(str(tmp_path / ".metrics.json.")) and calls[2][1] == str(tmp_path)
    assert path.read_text() == "{}"
