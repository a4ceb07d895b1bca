"""finetune.run.staged: a folder is written whole or not at all. Faults injected at every point of a write: the
folder that was there stays as it was, no staging folder is left, and a write the user can fix (a full disk, a
read-only folder; as an OSError or as safetensors' own error) is one message."""

import errno
import os

import pytest
from safetensors import SafetensorError

from finetune.errors import UserError
from finetune.run import staged


def old_folder(tmp_path):
    final = tmp_path / "merged"
    final.mkdir()
    (final / "model.safetensors").write_text("old")
    return final


def left_as_it_was(final):
    assert (final / "model.safetensors").read_text() == "old"
    assert sorted(p.name for p in final.parent.iterdir()) == ["merged"]


@pytest.mark.parametrize("fault, reason", [
    (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), os.strerror(errno.ENOSPC)),
    (OSError(errno.EROFS, os.strerror(errno.EROFS)), os.strerror(errno.EROFS)),
    (SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
     os.strerror(errno.ENOSPC)),
], ids=["disk full", "read-only", "disk full in safetensors"])
@pytest.mark.parametrize("after", [0, 1, 2], ids=["before any file", "after one file", "after every file"])
def test_a_write_that_fails_keeps_the_old_folder_and_says_why(tmp_path, fault, reason, after):
    final = old_folder(tmp_path)
    with pytest.raises(UserError) as e:
        with staged(final) as tmp:
            for name in ["model.safetensors", "config.json"][:after]:
                (tmp / name).write_text("new")
            raise fault
    assert str(e.value).startswith(f"Could not write {final} ({reason})")
    assert "The merged/ already there is kept." in str(e.value)
    left_as_it_was(final)


@pytest.mark.parametrize("fault", [KeyboardInterrupt(), ValueError("a bug")], ids=["Ctrl-C", "another error"])
def test_anything_else_stops_the_write_and_passes_through(tmp_path, fault):
    final = old_folder(tmp_path)
    with pytest.raises(type(fault)):
        with staged(final) as tmp:
            (tmp / "model.safetensors").write_text("new")
            raise fault
    left_as_it_was(final)


def test_a_swap_cut_short_between_its_renames_is_finished_next_time(tmp_path):
    final = old_folder(tmp_path)
    os.replace(final, final.with_name(".merged.old"))  # killed after the first rename
    with staged(final) as tmp:
        (tmp / "model.safetensors").write_text("new")
    assert (final / "model.safetensors").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_a_file_written_whole_or_not_at_all(tmp_path):
    from finetune.run import write_whole

    path = tmp_path / "summary.json"
    path.write_text("old")

    def cut_short(tmp):
        tmp.write_text("half")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(OSError):
        write_whole(path, cut_short)
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]
    write_whole(path, lambda tmp: tmp.write_text("new"))
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]
