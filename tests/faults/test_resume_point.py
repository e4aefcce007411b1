"""A failed save never loses the resume point; one trainer per task (the lock names the other's pid)."""

from __future__ import annotations

import errno
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lorax.continual.state import is_state, resume_dir
from lorax.continual.trainer import CHECKPOINT, train_task
from pipelines import lifetime
from pipelines.lifetime import TaskBusy, lock_path, task_lock
from tests.conftest import tiny_params


@pytest.fixture(scope="module")
def first_task(tmp_path_factory):
    """The tiny zoo's first task, prepared (manifest rows relative to data.root)."""
    from lorax.data.manifest import load_stream_manifests
    from lorax.data.prepare import prepare_tasks
    from lorax.data.zoo import synth_tasks

    root = tmp_path_factory.mktemp("resume")
    params = tiny_params(root, stream={"deconv": {"prev": "init"}})
    synth_tasks(params.tasks, params.data.root, params.zoo)
    prepare_tasks(params.data.root, params.tasks, params.data.manifests, params.data, params.model.img_size)
    return params, load_stream_manifests(params.data.manifests, params.tasks, params.data.root)["deconv"]


def test_a_failing_save_leaves_the_epoch_checkpoint_and_the_next_run_resumes(first_task, tmp_path, monkeypatch,
                                                                               caplog) -> None:
    import safetensors.torch

    params, manifest = first_task
    out = tmp_path / "state" / "deconv"
    real_save = safetensors.torch.save_file

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)  # the disk fills up while the state is saved
    with pytest.raises(OSError, match="No space left"):
        train_task(None, manifest, None, params, out)
    ckpt = resume_dir(out) / CHECKPOINT
    assert ckpt.is_file(), "the failed save removed the epoch checkpoint"
    assert not is_state(out)

    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    epochs: list[int] = []
    caplog.set_level("INFO", logger="lorax.continual.trainer")
    train_task(None, manifest, None, params, out, callback=lambda e, row: epochs.append(e))
    assert "resuming from the checkpoint of epoch" in caplog.text
    assert epochs == [] and is_state(out)  # nothing left to train: the one epoch was checkpointed
    assert not resume_dir(out).exists() and not out.with_name("deconv.saving").exists()


def test_an_older_projects_resume_folder_is_still_read(first_task, tmp_path, monkeypatch, caplog) -> None:
    """Projects made before the names were split kept the epoch checkpoint in ``<state>.partial/``."""
    import safetensors.torch

    params, manifest = first_task
    out = tmp_path / "state" / "deconv"

    def io_error(*args, **kwargs):
        raise OSError(errno.EIO, "I/O error")

    with monkeypatch.context() as m:
        m.setattr(safetensors.torch, "save_file", io_error)
        with pytest.raises(OSError):
            train_task(None, manifest, None, params, out)
    resume_dir(out).rename(out.with_name("deconv.partial"))
    caplog.set_level("INFO", logger="lorax.continual.trainer")
    train_task(None, manifest, None, params, out)
    assert "resuming from the checkpoint of epoch" in caplog.text and is_state(out)
    assert not out.with_name("deconv.partial").exists()


def test_a_second_trainer_of_a_task_waits_then_stops_naming_the_first(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(lifetime, "LOCK_WAIT_S", 1.0)
    state = tmp_path / "state" / "deconv"
    locks = tmp_path / "locks"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pipelines.lifetime import task_lock; from pathlib import Path\n"
        f"with task_lock(Path({str(locks)!r}), Path({str(state)!r}), 'deconv'):\n"
        "    print('held', flush=True); time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.monotonic()
        with pytest.raises(TaskBusy) as e:
            with task_lock(locks, state, "deconv"):
                pass
        assert time.monotonic() - t0 >= 1.0  # it waited for the first to end
        msg = str(e.value)
        assert "\n" not in msg and f"process {holder.pid}" in msg and str(state) in msg
    finally:
        holder.kill()
        holder.wait()
    with task_lock(locks, state, "deconv"):  # a killed holder leaves no lock behind
        assert lock_path(locks, state).is_file()
