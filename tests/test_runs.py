"""Runs are owned and immutable (issue 16): --resume restores the run's own config and refuses changes to
the experiment, nothing is written before every check passed, one process at a time trains into a folder
(its lock names the holder; a killed holder's lock is taken over), a folder with any checkpoint is never
new, and every failure a user can cause (a bad config value, a full disk, a read-only folder, Ctrl-C) ends
in one line that says what to do, never a traceback, with the run folder as it was.

One tiny run is trained once per module (in this process) and copied for each test that changes it.
Commands a user types run as subprocesses from a temporary folder, as in tests/test_train.py.
"""

from __future__ import annotations

import hashlib
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
from safetensors import SafetensorError

from smat.config import load_config
from smat.evaluation.runs import load_run
from smat.runtime import checkpoint
from smat.runtime.io import OutputError
from smat.runtime.lock import LOCK_NAME, LockError, RunLock
from smat.train import main, parse_args, prepare
from smat.training.pretrain import pretrained_builtin

TINY = ["pretrain.epochs=1", "device=cpu", "train.tasks_per_epoch=8", "train.val_episodes=1"]
TIMEOUT = 600


def train_tiny_run(tmp_path_factory, *overrides: str) -> Path:
    """A finished tiny run (2 steps, one checkpoint), trained in this process with the built-in backbone that
    tests/test_train.py pre-trains into the cache."""
    pretrained_builtin(load_config(None, ["pretrain.epochs=1"]), log=lambda *args: None)
    run = tmp_path_factory.mktemp("runs") / "trained"
    assert main([*TINY, "train.epochs=1", *overrides, "--skip-eval", f"output={run}"]) == 0
    return run


def copy_run(trained: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished tiny run at τ = 0.5."""
    return train_tiny_run(tmp_path_factory, "train.tau=0.5")


@pytest.fixture
def run(trained, tmp_path) -> Path:
    return copy_run(trained, tmp_path)


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` and a hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def cli(tmp_path: Path, module: str, *arguments: str, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """``python -m smat.<module> arguments`` from a temporary folder, one OpenMP thread."""
    cwd = tmp_path / "cwd"
    cwd.mkdir(exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*prefix, sys.executable, "-m", f"smat.{module}", *arguments], capture_output=True,
                          text=True, cwd=cwd, env=env, timeout=TIMEOUT)


def the_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """The one ``error:`` line of a failed command (exit 2, no traceback), holding every fragment."""
    output = result.stdout + result.stderr
    assert result.returncode == 2, f"exit {result.returncode}:\n{output[-3000:]}"
    assert "Traceback" not in output, output[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    message = result.stderr[result.stderr.index("error:"):]
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


# --------------------------------------------------------------------------
# items 2 and 3: --resume restores the run's own config; a refused resume changes nothing
# --------------------------------------------------------------------------


def test_resume_restores_the_runs_own_config(run, capsys):
    """The README's resume line (no overrides) continues with τ = 0.5 from config.yaml, not the default
    0.9; a change that cannot alter the experiment (evaluate.*) is taken and recorded."""
    assert main([f"output={run}", "--resume", "--skip-eval", "evaluate.episodes=3"]) == 0
    assert f"resumed from {run / 'checkpoints' / 'step-0000002'} at step 2/2" in capsys.readouterr().out
    saved = load_config(run / "config.yaml")
    assert saved.train.tau == 0.5 and saved.train.epochs == 1 and saved.train.tasks_per_epoch == 8
    assert saved.evaluate.episodes == 3


def test_resume_accepts_the_original_command_again(run):
    config, _, _, resumed, lock = prepare(parse_args([*TINY, "train.epochs=1", "train.tau=0.5", f"output={run}",
                                                      "--resume", "device=cpu", "data.num_workers=0"]))
    lock.release()
    assert resumed and config.train.tau == 0.5


def test_a_refused_resume_leaves_the_run_untouched(run, tmp_path):
    before = snapshot(run)
    result = cli(tmp_path, "train", f"output={run}", "--resume", "model.num_experts=4", "train.tau=0.9",
                 "evaluate.episodes=3")
    the_error(result, "model.num_experts (8 → 4)", "train.tau (0.5 → 0.9)", "may change only device, output, "
              "data.num_workers, keep_checkpoints, evaluate.*", "output=ANOTHER_FOLDER")
    assert snapshot(run) == before


# --------------------------------------------------------------------------
# item 4: one training per folder, its holder named; a killed holder's lock is taken over
# --------------------------------------------------------------------------


@pytest.mark.parametrize("resume", [True, False], ids=["resume", "new run"])
def test_a_second_training_into_a_folder_in_use_is_refused(run, tmp_path, resume):
    folder = run if resume else tmp_path / "fresh"
    folder.mkdir(exist_ok=True)
    with RunLock(folder):  # this process stands for a training in progress
        before = snapshot(folder)
        result = cli(tmp_path, "train", *TINY, f"output={folder}", *(["--resume"] if resume else []))
        the_error(result, f"{folder} is in use by process {os.getpid()} on {socket.gethostname()}",
                  "wait for it to finish", "output=PATH")
        assert snapshot(folder) == before
    assert not (folder / LOCK_NAME).exists()


def test_the_lock_is_exclusive_within_one_host(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(LockError, match=f"in use by process {os.getpid()}"):
            RunLock(tmp_path).acquire()


def kill_a_lock_holder(folder: Path) -> int:
    """The PID of a process that took ``folder``'s lock and was SIGKILLed holding it."""
    holder = subprocess.run([sys.executable, "-c", "import os, signal, sys; from smat.runtime.lock import RunLock; "
                             "print(os.getpid(), flush=True); RunLock(sys.argv[1]).acquire(); "
                             "os.kill(os.getpid(), signal.SIGKILL)", str(folder)],
                            capture_output=True, text=True, timeout=TIMEOUT)
    assert holder.returncode == -signal.SIGKILL, holder.stderr
    assert (folder / LOCK_NAME).is_file()  # left behind with its owner, and held by nobody
    return int(holder.stdout.split()[0])


def test_a_stale_lock_of_a_killed_process_is_taken_over(run, capsys):
    dead = kill_a_lock_holder(run)
    assert main([f"output={run}", "--resume", "--skip-eval"]) == 0
    assert (f"took over the stale lock of process {dead} on {socket.gethostname()}"
            in capsys.readouterr().out)
    assert not (run / LOCK_NAME).exists()


def test_the_stale_lock_names_its_dead_owner(tmp_path):
    dead = kill_a_lock_holder(tmp_path)
    lock = RunLock(tmp_path).acquire()
    try:
        assert lock.previous["pid"] == dead and lock.previous["host"] == socket.gethostname()
    finally:
        lock.release()


def test_under_torchrun_only_the_main_process_takes_the_lock(run, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with RunLock(run):  # rank 0 holds it; rank 1 neither waits for it nor is refused
        config, _, _, resumed, lock = prepare(parse_args([f"output={run}", "--resume"]))
    assert lock is None and resumed and config.train.tau == 0.5


# --------------------------------------------------------------------------
# item 5: a folder with any checkpoint is never new
# --------------------------------------------------------------------------


def test_a_folder_with_checkpoints_is_never_new_whatever_its_pointers_say(run, tmp_path):
    for pointer in ("latest", "best"):
        (checkpoint.checkpoint_dir(run) / pointer).unlink()
    before = snapshot(run)
    the_error(cli(tmp_path, "train", *TINY, f"output={run}"), f"{run} already holds a run", "--resume")
    assert snapshot(run) == before
    assert checkpoint.resolve(run) == checkpoint.checkpoint_dir(run) / "step-0000002"  # resume still finds it


def test_resume_needs_a_run(tmp_path):
    (tmp_path / "empty").mkdir()
    assert main([f"output={tmp_path / 'empty'}", "--resume", *TINY]) == 2
    assert list((tmp_path / "empty").iterdir()) == []


# --------------------------------------------------------------------------
# item 7: a full disk, a read-only file system, a refused permission
# --------------------------------------------------------------------------


def mount_namespace() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                           capture_output=True)
    return probe.returncode == 0


needs_mounts = pytest.mark.skipif(not mount_namespace(), reason="needs unshare -m and tmpfs mounts (root)")


def in_small_filesystem(folder: Path, size: str, command: list[str], read_only: bool = False) -> list[str]:
    """``command`` in a private mount namespace where ``folder`` is a fresh tmpfs of ``size`` (its previous
    contents copied in), remounted read-only when asked."""
    staging = f"{folder}.contents"
    shutil.copytree(folder, staging) if folder.exists() else Path(staging).mkdir()
    folder.mkdir(exist_ok=True)
    script = (f"mount -t tmpfs -o size={size} tmpfs {folder} && cp -a {staging}/. {folder}/"
              + (f" && mount -o remount,ro {folder}" if read_only else "") + ' && exec "$@"')
    return ["unshare", "-m", "sh", "-c", script, "sh", *command]


@needs_mounts
def test_a_full_disk_is_one_clear_error(tmp_path):
    """θ_pre (2.8 MB) does not fit a 1 MB file system: safetensors raised SafetensorError with a traceback."""
    folder = tmp_path / "full"
    result = cli(tmp_path, "train", *TINY, f"output={folder}", "--skip-eval",
                 prefix=tuple(in_small_filesystem(folder, "1m", [])))
    the_error(result, f"no space left on the device holding {folder / 'backbone.safetensors'}",
              "free some space or choose another output folder")


@needs_mounts
def test_a_read_only_run_folder_is_one_clear_error(run, tmp_path):
    result = cli(tmp_path, "train", f"output={run}", "--resume", "--skip-eval",
                 prefix=tuple(in_small_filesystem(run, "256m", [], read_only=True)))
    the_error(result, f"cannot write to {run}", "(permission denied or read-only)", "writable output folder")


@pytest.mark.parametrize("code, expected", [(28, "no space left on the device holding"),
                                            (13, "(permission denied or read-only)"),
                                            (30, "(permission denied or read-only)")])
def test_safetensors_write_failures_are_output_errors(tmp_path, monkeypatch, code, expected):
    def failing(tensors, path):
        raise SafetensorError(f"Error while serializing: I/O error: {os.strerror(code)} (os error {code})")

    monkeypatch.setattr(checkpoint, "save_file", failing)
    with pytest.raises(OutputError) as error:
        checkpoint.save_backbone(tmp_path, {"weight": torch.zeros(3)})
    assert expected in str(error.value) and str(tmp_path / "backbone.safetensors") in str(error.value)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------
# item 9: every config value is checked before anything is created
# --------------------------------------------------------------------------


@pytest.mark.parametrize("override, fragment", [
    ("device=tpu", "device='tpu': smat runs on auto, cpu, cuda or cuda:N"),
    ("model.backend=bogus", "model.backend='bogus' is not a smat_kernels backend"),
])
def test_bad_config_values_stop_before_the_folder_is_made(tmp_path, override, fragment):
    folder = tmp_path / "never"
    the_error(cli(tmp_path, "train", *TINY, override, f"output={folder}"), fragment)
    assert not folder.exists()


@pytest.mark.parametrize("override, fragment", [
    ("train.epochs=", "train.epochs must be an integer; got None"),
    ("keep_checkpoints=0", "keep_checkpoints must be a positive integer"),
    ("seed=-1", "seed must be a non-negative integer"),
    ("data.num_workers=-2", "data.num_workers must be a non-negative integer"),
    ("pretrain.lr=0", "pretrain.lr must be a positive number"),
    ("train.temperature.end=9", "train.temperature.end (9.0) must not exceed"),
    ("model.hyper_heads=0", "model.hyper_heads must be a positive integer"),
    ("data.train_crop_scale=[0,2]", "data.train_crop_scale must be [low, high]"),
    ("model.expert_patterns=[]", "model.expert_patterns must be a non-empty list"),
    ("output=", "output must be a non-empty string"),
])
def test_more_bad_config_values_stop_before_the_folder_is_made(tmp_path, capsys, override, fragment):
    folder = tmp_path / "never"
    arguments = [*TINY, f"output={folder}", override] if not override.startswith("output") else [*TINY, override]
    assert main(arguments) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: invalid config") and fragment in error, error
    assert not folder.exists()


# --------------------------------------------------------------------------
# item 10: stale temporaries, evaluation without optimizer.pt, Ctrl-C
# --------------------------------------------------------------------------


def test_stale_temporaries_are_removed_on_the_next_start(run):
    leftovers = [checkpoint.checkpoint_dir(run) / ".step-0000004.k1ll3d.tmp", run / ".config.yaml.x1.tmp",
                 checkpoint.checkpoint_dir(run) / ".latest.y2.tmp"]
    leftovers[0].mkdir()
    (leftovers[0] / "trainable.safetensors").write_bytes(b"half")
    for path in leftovers[1:]:
        path.write_text("half")
    assert main([f"output={run}", "--resume", "--skip-eval"]) == 0
    assert not any(path.exists() for path in leftovers)
    assert checkpoint.resolve(run).name == "step-0000002"


def test_evaluation_does_not_need_optimizer_state(run):
    folder = checkpoint.resolve(run, "best")
    (folder / "optimizer.pt").write_bytes(b"damaged")
    loaded = load_run(run, "cpu")
    assert loaded.state["step"] == 2
    (folder / "optimizer.pt").unlink()
    assert load_run(run, "cpu").state["step"] == 2


def default_sigint():
    """A shell's background job (``pytest … &``) ignores SIGINT, and so would the training it starts; Ctrl-C
    is what this test sends, so the child gets the default disposition back (Python then raises
    KeyboardInterrupt)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_says_how_to_resume(tmp_path):
    folder = tmp_path / "interrupted"
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    log = tmp_path / "train.log"
    with log.open("w") as file:
        process = subprocess.Popen([sys.executable, "-m", "smat.train", *TINY, "train.epochs=50", "--skip-eval",
                                    f"output={folder}"], stdout=file, stderr=subprocess.PIPE, text=True, cwd=cwd,
                                   env={**os.environ, "OMP_NUM_THREADS": "1"}, preexec_fn=default_sigint)
    try:
        deadline = time.monotonic() + TIMEOUT
        while not (checkpoint.checkpoint_dir(folder) / "latest").exists():
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr + log.read_text()
    last = stderr.replace("\r", "\n").strip().splitlines()[-1]
    assert last == f"interrupted; resume with: python -m smat.train output={folder} --resume"
    assert not (folder / LOCK_NAME).exists()
    assert prepare(parse_args([f"output={folder}", "--resume"]))[4].release() is None  # the hint works
