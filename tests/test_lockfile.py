"""A dvc.lock cut short by a kill is restored from the last good copy (real `dvc status` after it),
or refused with the fix; and a killed stage's failure is told apart from an input error for retries."""
import pytest

from conftest import BIN, sh
from flows.finetune import StageFailed, is_transient
from loraflow.errors import LoraflowError
from loraflow.lockfile import GOOD_COPY, check_or_restore


@pytest.fixture
def dvc_project(tmp_path):
    sh(["git", "init", "-q"], tmp_path)
    sh([str(BIN / "dvc"), "init", "-q"], tmp_path)
    (tmp_path / "in.txt").write_text("x\n")
    (tmp_path / "dvc.yaml").write_text("stages:\n  copy:\n    cmd: cp in.txt out.txt\n    deps: [in.txt]\n    outs: [out.txt]\n")
    sh([str(BIN / "dvc"), "repro"], tmp_path)
    return tmp_path


@pytest.mark.parametrize("keep", [0, 37, 71, 156], ids=lambda n: f"first {n} bytes")
def test_a_truncated_lock_is_restored_from_the_last_good_copy(dvc_project, keep):
    lock = dvc_project / "dvc.lock"
    good = lock.read_bytes()
    assert check_or_restore(dvc_project) is None and (dvc_project / GOOD_COPY).read_bytes() == good
    lock.write_bytes(good[:keep])  # what a kill while DVC writes it leaves
    assert sh([str(BIN / "dvc"), "status"], dvc_project, check=False).returncode != 0  # DVC alone is stuck there
    assert "restored the last good copy" in check_or_restore(dvc_project)
    assert lock.read_bytes() == good
    assert "up to date" in sh([str(BIN / "dvc"), "status"], dvc_project).stdout


def test_with_no_good_copy_the_run_stops_with_the_fix(dvc_project):
    (dvc_project / "dvc.lock").write_bytes(b"")
    with pytest.raises(LoraflowError, match="git checkout dvc.lock"):
        check_or_restore(dvc_project)


@pytest.mark.parametrize("output, code, retried", [
    ("ERROR: failed to reproduce 'train': failed to run: bin/stage train, exited with -9", 255, True),
    ("ERROR: failed to reproduce 'train': failed to run: bin/stage train, exited with 137", 255, True),
    ("ERROR: '/ws/dvc.yaml' is busy, it is being blocked by:\n  (PID 123): dvc repro", 255, True),
    ("loraflow validate: error: 40 of 100 rows rejected\nERROR: failed to reproduce 'validate': failed to run: "
     "bin/stage validate, exited with 2", 255, False),
])
def test_retries_fire_for_kills_and_busy_locks_not_for_input_errors(output, code, retried):
    assert is_transient(StageFailed(f"stage x failed (exit {code}):\n{output}", code)) is retried
