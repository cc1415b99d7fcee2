"""No command destroys a run (issue 22): outputs never land in a run folder, a full disk while optimizer.pt
is written is one clear line, damaged or pointer-less run folders are one clear line or recovered, NaN
weights are caught with the tensor's name, SIGTERM is Ctrl-C, run files follow the umask.

One tiny run is trained once per module (as in tests/test_runs.py) and copied for each test that changes it.
The run-folder fuzzer (tests/test_run_folder_fuzz.py) covers every file × damage × command; these are the
named cases of the issue, with their exact messages.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_runs import TIMEOUT, TINY, cli, copy_run, default_sigint, needs_mounts, snapshot, the_error, train_tiny_run

from smat import export as export_cli
from smat.evaluation.runs import load_run
from smat.runtime import checkpoint, io
from smat.runtime.io import OutputError
from smat.runtime.lock import RunLock
from smat.training import Trainer, TrainingError


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished tiny run at the default τ."""
    return train_tiny_run(tmp_path_factory)


@pytest.fixture
def run(trained, tmp_path) -> Path:
    return copy_run(trained, tmp_path)


STEP = "checkpoints/step-0000002"


# --------------------------------------------------------------------------
# item 1: no command writes into what it did not create
# --------------------------------------------------------------------------


def test_export_into_a_run_folder_is_refused_and_changes_nothing(run, tmp_path):
    target = tmp_path / "target"
    shutil.copytree(run, target)
    before = snapshot(target)
    the_error(cli(tmp_path, "export", str(run), "--output", str(target)), f"{target} holds a training run",
              "choose another output folder")
    assert snapshot(target) == before
    the_error(cli(tmp_path, "export", str(run), "--output", str(target), "--overwrite"), "holds a training run")
    assert snapshot(target) == before


def test_export_refuses_an_export_or_other_files_without_overwrite(run, tmp_path, capsys):
    first = tmp_path / "export"
    assert export_cli.main([str(run), "--output", str(first)]) == 0
    before = snapshot(first)
    capsys.readouterr()
    assert export_cli.main([str(run), "--output", str(first)]) == 2
    error = capsys.readouterr().err
    assert "holds an export" in error and "--overwrite" in error and snapshot(first) == before
    assert export_cli.main([str(run), "--output", str(first), "--overwrite"]) == 0
    other = tmp_path / "photos"
    other.mkdir()
    (other / "holiday.jpg").write_bytes(b"mine")
    assert export_cli.main([str(run), "--output", str(other)]) == 2
    assert "holds other files (holiday.jpg)" in capsys.readouterr().err
    assert sorted(p.name for p in other.iterdir()) == ["holiday.jpg"]


def test_evaluate_and_predict_refuse_to_write_into_a_run(run, tmp_path):
    before = snapshot(run)
    the_error(cli(tmp_path, "evaluate", "--checkpoint", str(run), "--output", str(run), "device=cpu"),
              f"{run} holds a training run")
    the_error(cli(tmp_path, "predict", "--checkpoint", str(run), "--support", str(tmp_path), "--query",
                  str(tmp_path), "--output", str(run / "predictions.csv")), f"{run} holds a training run")
    assert snapshot(run) == before


def test_predict_does_not_replace_a_file_it_did_not_write(tmp_path):
    from smat.predict import check_output

    mine = tmp_path / "notes.csv"
    mine.write_text("my,own,data\n")
    with pytest.raises(OutputError, match="not a predictions CSV"):
        check_output(mine, overwrite=False)
    assert check_output(mine, overwrite=True) == mine
    earlier = tmp_path / "predictions.csv"
    earlier.write_text("file,predicted,probability\na.png,cat,0.9\n")
    assert check_output(earlier, overwrite=False) == earlier


def test_an_output_folder_under_a_held_lock_is_refused(tmp_path):
    folder = tmp_path / "training"
    folder.mkdir()
    with RunLock(folder), pytest.raises(OutputError, match="holds a training run"):
        io.check_output_folder(folder, overwrite=True)


# --------------------------------------------------------------------------
# item 2: a full disk while optimizer.pt is written
# --------------------------------------------------------------------------


@needs_mounts
def test_a_full_disk_while_optimizer_state_is_written_is_one_line(tmp_path):
    """58 MiB hold θ_pre (2.7 MiB), the first checkpoint (29 MiB) and the second's tensors (25 MiB), not its
    optimizer.pt (3.8 MiB): torch's zip writer used to hide the ENOSPC in a RuntimeError traceback. The
    folder is copied out of its private file system afterwards, to check the first checkpoint."""
    folder, after = tmp_path / "full", tmp_path / "after"
    folder.mkdir()
    script = (f"mount -t tmpfs -o size=58m tmpfs {folder} && \"$@\"; code=$?; mkdir {after} && "
              f"cp -a {folder}/. {after}/; exit $code")
    result = cli(tmp_path, "train", *TINY, "train.epochs=2", f"output={folder}", "--skip-eval",
                 prefix=("unshare", "-m", "sh", "-c", script, "sh"))
    the_error(result, "no space left on the device holding", "step-0000004", "free some space")
    assert checkpoint.resolve(after).name == "step-0000002"
    assert checkpoint.load(checkpoint.resolve(after))[2]["step"] == 2
    assert not [p for p in [*after.iterdir(), *checkpoint.checkpoint_dir(after).iterdir()] if p.name.endswith(".tmp")]


def test_optimizer_state_reaches_the_disk_as_one_plain_write(tmp_path, monkeypatch):
    """What the zip writer would have hidden: the write of the serialised bytes fails with the OSError."""
    checkpoint.save(tmp_path, 1, {"delta": torch.ones(3)}, {"optimizers": {}}, {"step": 1})
    write_bytes = Path.write_bytes

    def full(path, data):
        if path.name == "optimizer.pt":
            raise OSError(28, os.strerror(28))
        return write_bytes(path, data)

    monkeypatch.setattr(Path, "write_bytes", full)
    with pytest.raises(OutputError, match="no space left on the device holding .*step-0000002"):
        checkpoint.save(tmp_path, 2, {"delta": torch.ones(3)}, {"optimizers": {}}, {"step": 2})
    monkeypatch.undo()
    assert checkpoint.resolve(tmp_path).name == "step-0000001"
    assert checkpoint.load(checkpoint.resolve(tmp_path))[2]["step"] == 1
    assert [p.name for p in checkpoint.checkpoint_dir(tmp_path).iterdir() if p.name.startswith(".")] == []


# --------------------------------------------------------------------------
# item 3: the damaged run folders the issue names
# --------------------------------------------------------------------------


def test_resume_without_optimizer_state_is_one_line(run, tmp_path):
    (run / STEP / "optimizer.pt").unlink()
    before = snapshot(run)
    the_error(cli(tmp_path, "train", f"output={run}", "--resume", "--skip-eval"),
              f"{run / STEP / 'optimizer.pt'} is missing", "restore it from a backup")
    assert snapshot(run) == before


@pytest.mark.parametrize("text", ["- 1\n- 2\n", "just words\n", "5\n"])
def test_a_config_that_is_not_a_mapping_is_one_line(run, tmp_path, text):
    (run / "config.yaml").write_text(text)
    before = snapshot(run)
    for command in (["train", f"output={run}", "--resume"], ["evaluate", "--checkpoint", str(run)]):
        the_error(cli(tmp_path, *command), f"{run / 'config.yaml'} is damaged", "must hold a mapping of config keys",
                  f"under 'config' in {run / STEP / 'state.json'}")
    assert snapshot(run) == before


def test_a_config_that_the_tensors_do_not_fit_is_one_line(run, tmp_path):
    """Another M in config.yaml: the checkpoint's recorded config names the difference; a checkpoint written
    before configs were recorded fails on the tensors' shapes, also as one line."""
    path = run / "config.yaml"
    path.write_text(path.read_text().replace("num_experts: 8", "num_experts: 4"))
    the_error(cli(tmp_path, "train", f"output={run}", "--resume"), f"{path} does not match the config",
              "model.num_experts: 4 there, 8 in the checkpoint")
    state_path = run / STEP / "state.json"
    state = json.loads(state_path.read_text())
    del state["config"]
    state["num_experts"] = 4
    state_path.write_text(json.dumps(state))
    before = snapshot(run)
    the_error(cli(tmp_path, "train", f"output={run}", "--resume"), "trainable.safetensors", "does not fit")
    assert snapshot(run) == before


def test_a_partial_last_log_line_is_dropped_with_a_warning(run, tmp_path):
    log = run / "metrics.jsonl"
    complete = log.read_text()
    log.write_text(complete + '{"kind": "train", "step": 3, "lo')
    result = cli(tmp_path, "train", f"output={run}", "--resume", "--skip-eval")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"warning: {log}: its last line is incomplete" in result.stderr
    assert log.read_text() == complete


# --------------------------------------------------------------------------
# item 4: a finished run that lost its pointers
# --------------------------------------------------------------------------


def test_a_run_without_pointers_is_recovered_by_every_command(run, tmp_path):
    for name in ("latest", "best"):
        (checkpoint.checkpoint_dir(run) / name).unlink()
    loaded = load_run(run, "cpu")
    assert loaded.state["step"] == 2
    result = cli(tmp_path, "export", str(run), "--output", str(tmp_path / "export"))
    assert result.returncode == 0 and "using step-0000002" in result.stderr, result.stderr[-3000:]
    result = cli(tmp_path, "train", f"output={run}", "--resume", "--skip-eval")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"restored {checkpoint.checkpoint_dir(run) / 'latest'} → step-0000002" in result.stdout
    assert all((checkpoint.checkpoint_dir(run) / name).read_text() == "step-0000002\n" for name in ("latest", "best"))


def test_a_lost_best_pointer_is_recovered_to_the_best_validated_checkpoint(tmp_path):
    for step, best_val in ((1, 0.5), (2, 0.7), (3, 0.7)):
        checkpoint.save(tmp_path, step, {"delta": torch.ones(3)}, {}, {"step": step, "best_val": best_val},
                        best=step == 2, keep=3)
    (checkpoint.checkpoint_dir(tmp_path) / "best").write_bytes(b"\xff\x00garbage")
    with pytest.warns(checkpoint.RecoveryWarning, match="best is damaged"):
        assert checkpoint.resolve(tmp_path, "best").name == "step-0000002"
    (checkpoint.checkpoint_dir(tmp_path) / "latest").write_text("../../elsewhere\n")
    with pytest.warns(checkpoint.RecoveryWarning, match="using step-0000003, the newest complete"):
        assert checkpoint.resolve(tmp_path).name == "step-0000003"


# --------------------------------------------------------------------------
# item 7: non-finite weights
# --------------------------------------------------------------------------


def test_nan_weights_are_caught_with_the_tensors_name(run, tmp_path):
    folder = run / STEP
    tensors, optimizer, state = checkpoint.load(folder)
    name = next(key for key in tensors if "hyper" in key)
    tensors[name].view(-1)[0] = float("nan")
    state = {key: value for key, value in state.items() if key != "files"}
    checkpoint.save(run, 2, tensors, optimizer, state, best=True)  # consistent checksums: only the NaN is wrong
    before = snapshot(run)
    for command in (["evaluate", "--checkpoint", str(run), "device=cpu"],
                    ["export", str(run), "--output", str(tmp_path / "export")],
                    ["train", f"output={run}", "--resume"]):
        the_error(cli(tmp_path, *command), f"tensor {name!r} of {folder / 'trainable.safetensors'} holds NaN")
    assert snapshot(run) == before


# --------------------------------------------------------------------------
# item 10: SIGTERM, the umask, the non-finite-loss stop
# --------------------------------------------------------------------------


def test_sigterm_says_how_to_resume(tmp_path):
    folder = tmp_path / "terminated"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    process = subprocess.Popen([sys.executable, "-m", "smat.train", *TINY, "train.epochs=50", "--skip-eval",
                                f"output={folder}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1"}, preexec_fn=default_sigint)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (checkpoint.checkpoint_dir(folder) / "latest").exists():
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 143, stderr[-3000:]
    assert "Traceback" not in stderr
    last = stderr.replace("\r", "\n").strip().splitlines()[-1]
    assert last == f"interrupted; resume with: python -m smat.train output={folder} --resume"


def test_run_files_follow_the_umask(trained, tmp_path):
    for path in [trained, *trained.rglob("*")]:
        if path.name != ".lock":
            mode = stat.S_IMODE(path.stat().st_mode)
            assert mode == (0o755 if path.is_dir() else 0o644), f"{path}: {oct(mode)}"
    previous = os.umask(0o027)
    try:
        io.atomic_write_text(tmp_path / "a.txt", "x")
        with io.atomic_directory(tmp_path / "folder"):
            pass
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "a.txt").stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "folder").stat().st_mode) == 0o750


def test_the_non_finite_loss_stop_names_a_checkpoint_that_exists(trained, tmp_path):
    def stop(run: Path) -> str:
        trainer = SimpleNamespace(run=run, nonfinite_total=0, nonfinite_run=0, step=7, log=lambda *args: None,
                                  config=SimpleNamespace(train=SimpleNamespace(max_nonfinite=1)))
        trainer._last_good = lambda: Trainer._last_good(trainer)
        with pytest.raises(TrainingError) as error:
            Trainer._skip(trainer, float("nan"))
        return str(error.value)

    assert f"the last good checkpoint is {trained / STEP}" in stop(trained)
    assert (trained / STEP).is_dir()
    assert "no checkpoint was written before it" in stop(tmp_path)
