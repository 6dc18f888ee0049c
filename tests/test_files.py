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
