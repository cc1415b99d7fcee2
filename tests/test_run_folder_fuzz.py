"""Run-folder fuzzer (issue 22): any single file of a run folder damaged, then every command that reads runs.

One tiny run is trained once per module, and a second one of another shape (M = 2, twice the steps) gives
"another run's content". Every file of the run (config.yaml, the latest and best pointers, state.json,
metrics.jsonl, trainable.safetensors, optimizer.pt, backbone.safetensors) × every damage (truncated to half,
emptied, deleted, random bytes of the same length, bytes flipped in the middle, the other run's file) ×
every command (``--resume``, ``smat.evaluate``, ``smat.predict``, ``smat.export``) runs on its own copy of
the run. Each must either succeed (a lost pointer, a partial last log line and the files a command does not
read are recovered from or ignored) or end with exit 2 and exactly one ``error:`` line that names the
damaged file, never a traceback; and no file of the run folder may change, except what a successful resume
owns (the log it truncates to its step, the pointers it repairs, the config it writes back).

The cases run in two subprocesses (this file run as a script, half of the commands each, the two cores of
CI), each calling the commands' ``main`` in turn and printing one JSON line per case, so that torch is
imported twice instead of 192 times; a crash of the driver fails the test with the case that caused it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest

STEP = "checkpoints/step-0000002"
FILES = {"config.yaml": "config.yaml", "latest": "checkpoints/latest", "best": "checkpoints/best",
         "state.json": f"{STEP}/state.json", "metrics.jsonl": "metrics.jsonl",
         "trainable.safetensors": f"{STEP}/trainable.safetensors", "optimizer.pt": f"{STEP}/optimizer.pt",
         "backbone.safetensors": "backbone.safetensors"}
DAMAGES = ("truncated", "emptied", "deleted", "random", "flipped", "other run")
COMMANDS = ("resume", "evaluate", "predict", "export")
TINY = ["pretrain.epochs=1", "device=cpu", "train.val_episodes=1", "train.epochs=1", "--skip-eval"]
# what a successful resume may rewrite: the log (truncated to the checkpoint's step, a partial line dropped),
# the pointers it repairs, its config (written back unchanged), its lock while it runs
RESUME_OWNS = ("metrics.jsonl", "checkpoints", "checkpoints/latest", "checkpoints/best", "config.yaml")
TIMEOUT = 900


def expected(file: str, damage: str, command: str) -> str:
    """'ok' (must recover or not need the file), 'error' (must refuse, naming the file) or 'either'."""
    if file in ("latest", "best"):
        return "ok"  # a lost pointer is recovered from the complete step folders
    if file == "metrics.jsonl":
        if command != "resume" or damage in ("truncated", "emptied", "deleted", "other run"):
            return "ok"  # only a resume reads the log; a partial last line is dropped with a warning
        return "either"  # random bytes or a flipped middle: refused, unless the damage fell on the last line
    if file == "optimizer.pt" and command != "resume":
        return "ok"  # evaluation does not need the optimiser's state
    if file == "backbone.safetensors" and command == "resume":
        return "ok"  # a resume rebuilds θ_pre from the pre-trained backbone, not from the run's copy
    if file == "backbone.safetensors" and damage == "other run":
        return "either"  # both runs start from the same pre-trained backbone: the same bytes
    return "error"


# --------------------------------------------------------------------------
# the driver (this file run as a script)
# --------------------------------------------------------------------------


def damage_file(path: Path, damage: str, other: Path | None) -> None:
    data = path.read_bytes()
    path.unlink()  # a new file: the copy's other files are hard links to the pristine run
    generator = random.Random(f"{path.name} {damage}")
    if damage == "deleted":
        return
    if damage == "truncated":
        data = data[:len(data) // 2]
    elif damage == "emptied":
        data = b""
    elif damage == "random":
        data = bytes(generator.getrandbits(8) for _ in range(min(len(data), 1 << 16))) + data[1 << 16:]
    elif damage == "flipped":
        middle = len(data) // 2
        data = data[:middle] + bytes(b ^ 0xFF for b in data[middle:middle + 16]) + data[middle + 16:]
    elif damage == "other run":
        data = other.read_bytes() if other is not None and other.is_file() else b""
    path.write_bytes(data)


def signature(folder: Path) -> dict[str, list]:
    """Every entry under ``folder`` with its inode, size and modification time: an atomic replacement
    changes the inode, a write in place the time."""
    entries = {}
    for path in sorted(folder.rglob("*")):
        stat = path.lstat()
        entries[str(path.relative_to(folder))] = ["dir" if path.is_dir() else "file", stat.st_ino, stat.st_size,
                                                  stat.st_mtime_ns]
    return entries


def argv_of(command: str, run: Path, work: Path, images: Path) -> list[str]:
    if command == "resume":
        return [f"output={run}", "--resume", "--skip-eval"]
    if command == "evaluate":
        return ["--checkpoint", str(run), "--datasets", "latin", "--episodes", "1", "--output",
                str(work / "evaluation"), "--overwrite", "device=cpu"]
    if command == "predict":
        return ["--checkpoint", str(run), "--support", str(images / "support"), "--query", str(images / "query"),
                "--output", str(work / "predictions.csv"), "--device", "cpu", "--overwrite"]
    return [str(run), "--output", str(work / "export"), "--overwrite"]


def run_case(pristine: Path, other: Path, images: Path, work: Path, file: str, damage: str, command: str) -> dict:
    import smat.evaluate
    import smat.export
    import smat.predict
    import smat.train

    mains = {"resume": smat.train.main, "evaluate": smat.evaluate.main, "predict": smat.predict.main,
             "export": smat.export.main}
    run = work / "run"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    shutil.copytree(pristine, run, copy_function=os.link)
    damage_file(run / FILES[file], damage, other / FILES[file].replace(STEP, "checkpoints/step-0000004"))
    before = signature(run)
    stdout, stderr = io.StringIO(), io.StringIO()
    crash = ""
    start = time.perf_counter()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            code = mains[command](argv_of(command, run, work, images))
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
        except BaseException:  # noqa: BLE001 - an escaped exception is what the fuzzer looks for
            code, crash = 1, traceback.format_exc()
    seconds = time.perf_counter() - start
    after = signature(run)
    changed = sorted(name for name in before.keys() | after.keys() if before.get(name) != after.get(name))
    shutil.rmtree(work, ignore_errors=True)
    return {"file": file, "damage": damage, "command": command, "code": code, "stderr": stderr.getvalue()[-4000:],
            "stdout": stdout.getvalue()[-2000:], "crash": crash[-4000:], "changed": changed,
            "seconds": round(seconds, 2)}


def drive(pristine: Path, other: Path, images: Path, work: Path, commands: list[str]) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    for command in commands:
        for file in FILES:
            for damage in DAMAGES:
                print(json.dumps({"starting": [file, damage, command]}), flush=True)
                print(json.dumps(run_case(pristine, other, images, work, file, damage, command)), flush=True)


# --------------------------------------------------------------------------
# the tests
# --------------------------------------------------------------------------


def picture(path: Path, colour: tuple[int, int, int]) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), colour).save(path)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[tuple[str, str, str], dict]:
    from smat.train import main

    root = tmp_path_factory.mktemp("fuzz")
    pristine, other = root / "run", root / "other"
    assert main([*TINY, "train.tasks_per_epoch=8", f"output={pristine}"]) == 0
    assert main([*TINY, "train.tasks_per_epoch=16", "model.num_experts=2", f"output={other}"]) == 0
    assert (pristine / STEP / "state.json").is_file() and (other / "checkpoints/step-0000004").is_dir()
    images = root / "images"
    for index, (name, colour) in enumerate([("red", (220, 30, 30)), ("blue", (30, 30, 220))]):
        picture(images / "support" / name / "0.png", colour)
        picture(images / "query" / f"{index}.png", colour)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    halves = [COMMANDS[::2], COMMANDS[1::2]]
    drivers = [subprocess.Popen([sys.executable, __file__, str(pristine), str(other), str(images), str(root / f"w{i}"),
                                 *half], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
               for i, half in enumerate(halves)]
    found = {}
    for driver in drivers:
        out, err = driver.communicate(timeout=TIMEOUT)
        lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        last = lines[-1] if lines else {}
        assert driver.returncode == 0, f"the driver died (exit {driver.returncode}) in case {last}:\n{err[-3000:]}"
        found.update({(r["file"], r["damage"], r["command"]): r for r in lines if "code" in r})
    return found


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("file", FILES)
def test_a_damaged_run_folder(outcomes, file, damage, command):
    result = outcomes[(file, damage, command)]
    output = result["stdout"] + result["stderr"]
    assert not result["crash"], result["crash"]
    assert "Traceback" not in output, output
    errors = [line for line in result["stderr"].splitlines() if line.startswith("error:")]
    want = expected(file, damage, command)
    if result["code"] == 0:
        assert want != "error", f"{command} succeeded on a run whose {file} was {damage}:\n{output}"
        assert not errors, output
        owned = RESUME_OWNS if command == "resume" else ()
        assert not [name for name in result["changed"] if name not in owned], result["changed"]
    else:
        assert want != "ok", f"{command} did not recover from a {damage} {file}:\n{output}"
        assert result["code"] == 2 and len(errors) == 1, output
        assert file in errors[0] or file in result["stderr"][result["stderr"].index("error:"):], errors[0]
        assert result["changed"] == [], result["changed"]


if __name__ == "__main__":
    drive(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]), sys.argv[5:])
