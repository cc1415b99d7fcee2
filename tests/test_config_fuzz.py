"""Config files and values that cannot be run: each is one bounded `error:` line, never a traceback, and no
run folder (issue 22).

The fuzzer feeds ``python -m smat.train``'s entry (``smat.train.main``) random YAML structures (scalars,
lists, deep nesting, anchors and aliases up to a "billion laughs", non-string keys, duplicate keys, tags,
bytes that are not UTF-8, truncated configs), bad ``base:`` chains (cycles, missing files, wrong types, too
deep) and, for every field of the config dataclasses, values of the wrong type or out of range. The cases run
in batches in subprocesses (:data:`DRIVER`): each case in its own empty folder with ``output=out``, under a
time limit, and with smat.train's ``train`` replaced by a stub, so that a case the checks let through is
reported as "accepted" instead of training. Every case must end with exit code 2, exactly one line starting
with ``error:``, every line at most :data:`LINE_LIMIT` characters, no traceback, and nothing written.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest
import yaml

from smat import config as config_module
from smat.config import PACKAGE_CONFIGS, Config

LINE_LIMIT = 500  # characters of any line a rejected case prints
SEED = int(os.environ.get("SMAT_CONFIG_FUZZ_SEED", "22"))  # another seed, another set of random cases

# Runs the cases of a JSON file, each in its own folder, and writes what each printed and returned.
DRIVER = r'''
import contextlib, importlib, io, json, os, resource, signal, sys, traceback

cases_file, results_file = sys.argv[1], sys.argv[2]
modules = {}


class Accepted(Exception):
    pass


def accept(*args, **kwargs):
    raise Accepted()


def alarm(*_):
    raise TimeoutError("case ran past its time limit")


def module(name):
    if name not in modules:
        modules[name] = importlib.import_module(name)
        if name == "smat.train":
            modules[name].train = accept  # every check has passed: the config was accepted
        if name == "smat.study":
            modules[name].train_plan = accept
    return modules[name]


module("smat.train")
soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
resource.setrlimit(resource.RLIMIT_DATA, (6 << 30, hard))  # an expanding "billion laughs" is a MemoryError
signal.signal(signal.SIGALRM, alarm)
results = []
for case in json.load(open(cases_file)):
    os.chdir(case["cwd"])
    out, err = io.StringIO(), io.StringIO()
    code, crash = None, None
    signal.alarm(case.get("seconds", 60))
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = module(case["module"]).main(case["argv"])
    except Accepted:
        code = "accepted"
    except SystemExit as exit_:
        code = exit_.code
    except BaseException:
        crash = traceback.format_exc()[-3000:]
    finally:
        signal.alarm(0)
    results.append({"code": code, "crash": crash, "stdout": out.getvalue()[-20000:],
                    "stderr": err.getvalue()[-20000:], "stderr_bytes": len(err.getvalue())})
json.dump(results, open(results_file, "w"))
'''


def run_batch(cases: list[dict], folder: Path, timeout: int = 600) -> list[dict]:
    """Run ``cases`` ({module, argv, cwd}) in one subprocess; their results in order."""
    cases_file, results_file = folder / "cases.json", folder / "results.json"
    cases_file.write_text(json.dumps(cases))
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    finished = subprocess.run([sys.executable, "-c", DRIVER, str(cases_file), str(results_file)], cwd=folder,
                              capture_output=True, text=True, timeout=timeout, env=environment)
    assert finished.returncode == 0, finished.stderr[-3000:]
    return json.loads(results_file.read_text())


def problems_of(case: dict, result: dict) -> list[str]:
    """What is wrong with how a command ended on a config it must refuse (empty: it ended as it should)."""
    problems = []
    if result["crash"]:
        problems.append(f"raised:\n{result['crash']}")
    if result["code"] == "accepted":
        problems.append("was accepted")
    elif result["code"] != 2:
        problems.append(f"exit code {result['code']!r}")
    lines = result["stderr"].splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    if len(errors) != 1:
        problems.append(f"{len(errors)} error lines")
    if any(len(line) > LINE_LIMIT for line in lines) or result["stderr_bytes"] > 20000:
        problems.append(f"a line of {max(map(len, lines))} characters ({result['stderr_bytes']} bytes in all)")
    if "Traceback" in result["stderr"] + result["stdout"]:
        problems.append("printed a traceback")
    left = sorted(p.name for p in Path(case["cwd"]).iterdir()) if Path(case["cwd"]).is_dir() else []
    if sorted(left) != sorted(case["inputs"]):
        problems.append(f"the folder holds {left}, not only its inputs {case['inputs']}")
    return problems


def check_all(cases: list[dict], results: list[dict]) -> None:
    failed = [f"{case['name']}: {'; '.join(problems)}\n  stderr: {result['stderr'][:600]!r}"
              for case, result in zip(cases, results) if (problems := problems_of(case, result))]
    assert not failed, f"{len(failed)} of {len(cases)} cases failed:\n" + "\n".join(failed[:20])


class Cases:
    """Builds cases: each in its own folder under ``root``, with its input files."""

    def __init__(self, root: Path):
        self.root, self.cases = root, []

    def add(self, name: str, argv: list[str], files: dict[str, str | bytes] | None = None,
            module: str = "smat.train", seconds: int = 60) -> None:
        folder = self.root / f"case{len(self.cases):04d}"
        folder.mkdir(parents=True)
        for relative, content in (files or {}).items():
            path = folder / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                path.write_bytes(content)
            else:
                path.write_text(content, encoding="utf-8", errors="surrogatepass")
        inputs = sorted({Path(relative).parts[0] for relative in files or {}})
        self.cases.append({"name": name, "module": module, "argv": argv, "cwd": str(folder), "inputs": inputs,
                           "seconds": seconds})

    def file(self, name: str, text: str | bytes, *argv: str, **files) -> None:
        """A case of ``--config config.yaml`` holding ``text`` (and other files); output: the default, a folder
        under the case's own."""
        self.add(name, ["--config", "config.yaml", *argv], {"config.yaml": text, **files})

    def override(self, name: str, *overrides: str) -> None:
        self.add(name, ["output=out", *overrides])


# ---------------------------------------------------------------- random YAML structures

def field_names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def random_scalar(rng: random.Random):
    return rng.choice([
        rng.randint(-10, 10), 2**70, -(2**70), rng.random() * 10 ** rng.randint(-5, 5), float("nan"),
        float("inf"), True, False, None, "", "x" * rng.randint(1, 300), "ünïcödé ✓", "a: b", "- x", "{", "1e-3",
        "\u202e", "line\nbreak", "tab\tbed",
    ])


def random_value(rng: random.Random, depth: int):
    if depth <= 0 or rng.random() < 0.4:
        return random_scalar(rng)
    if rng.random() < 0.5:
        return [random_value(rng, depth - 1) for _ in range(rng.randint(0, 4))]
    keys = [rng.choice([random_scalar(rng), *field_names(Config), "model", "train", "zz"]) for _ in range(4)]
    return {key if isinstance(key, (str, int, float, bool)) or key is None else str(key): random_value(rng, depth - 1)
            for key in keys if not (isinstance(key, float) and key != key)}


def random_config(rng: random.Random) -> str:
    """A mapping of known and random keys with random values, ending in an unknown key (never a valid config)."""
    values = {}
    for _ in range(rng.randint(0, 6)):
        section = rng.choice(field_names(Config))
        default = getattr(Config(), section)
        if dataclasses.is_dataclass(default) and rng.random() < 0.7:
            values[section] = {rng.choice(field_names(type(default))): random_value(rng, 3) for _ in range(3)}
        else:
            values[section] = random_value(rng, 3)
    text = yaml.safe_dump(values, allow_unicode=rng.random() < 0.5, default_flow_style=rng.random() < 0.3)
    return text + f"zz_fuzz_{rng.randint(0, 10**6)}: 1\n"


def laughs(levels: int, width: int) -> str:
    lines = ["a0: &a0 [" + ", ".join(["lol"] * width) + "]"]
    for level in range(1, levels):
        lines.append(f"a{level}: &a{level} [" + ", ".join([f"*a{level - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


def structure_cases(cases: Cases, rng: random.Random) -> None:
    for index in range(60):
        cases.file(f"random config {index}", random_config(rng))
    for index in range(15):
        document = random_value(rng, 4)
        if isinstance(document, dict) or document is None:  # an empty or partly valid mapping: add a wrong key
            document = {**(document or {}), "zz_fuzz": 1}
        cases.file(f"random document {index}", yaml.safe_dump(document) + "\n")
    bundled = (PACKAGE_CONFIGS / "vit_small_dino_metadataset.yaml").read_text()
    for index in range(15):
        cut = rng.randint(1, len(bundled) - 1)
        cases.file(f"truncated config {index}", bundled[:cut] + "\nzz_fuzz: 1\n")
    for index in range(10):
        data = bytearray(bundled.encode())
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        cases.file(f"damaged bytes {index}", bytes(data) + b"\nzz_fuzz: 1\n")
    for index in range(5):
        cases.file(f"random bytes {index}", bytes(rng.randrange(256) for _ in range(rng.randint(1, 400))))
    cases.file("latin-1 text", "method: smat\n# caf\xe9\n".encode("latin-1"))
    cases.file("utf-16 with a BOM", "method: smat\nzz: 1\n".encode("utf-16"))
    cases.file("billion laughs", laughs(10, 10) + "seed: *a9\n")
    cases.file("billion laughs in a section", laughs(9, 9) + "model: {expert_patterns: *a8}\n")
    cases.file("billion laughs as config_files", laughs(9, 9) + "config_files: *a8\n")
    cases.file("billion laughs as a key", laughs(9, 9) + "? *a8\n: 1\n")
    cases.file("billion laughs as base", laughs(9, 9) + "base: *a8\n")
    cases.file("deep nesting (flow)", "seed: " + "[" * 5000 + "]" * 5000 + "\n")
    cases.file("deep nesting (block)", "".join("  " * i + f"k{i}:\n" for i in range(300)) + "  " * 300 + "v: 1\n")
    cases.file("deep nesting of known sections", "model:\n  builtin:\n    depth:\n      x:\n        y: 1\n")
    cases.file("a scalar", "5\n")
    cases.file("a list", "- method: smat\n")
    cases.file("a string", "just text\n")
    cases.file("null key", "null: 1\n")
    cases.file("integer key", "1: 2\n")
    cases.file("float key", "1.5: 2\n")
    cases.file("bool key in a section", "train:\n  true: 1\n")
    cases.file("list key", "? [a, b]\n: 1\n")
    cases.file("mapping key", "? {a: 1}\n: 1\n")
    cases.file("duplicate top-level key", "seed: 1\nmethod: smat\nseed: 2\n")
    cases.file("duplicate key in a section", "train:\n  tau: 0.5\n  tau: 0.9\n")
    cases.file("duplicate key in flow", "train: {tau: 0.5, tau: 0.9}\n")
    cases.file("a python tag", "seed: !!python/object/apply:os.system ['true']\n")
    cases.file("a python name tag", "seed: !!python/name:os.system\n")
    cases.file("a binary value", "output: !!binary aGVsbG8=\n")
    cases.file("a set", "model: {expert_patterns: !!set {a, b}}\n")
    cases.file("a timestamp", "output: 2001-12-14t21:59:43.10-05:00\n")
    cases.file("an unknown tag", "seed: !custom 5\n")
    cases.file("an undefined alias", "seed: *nothing\n")
    cases.file("an integer of 5000 digits", "seed: " + "9" * 5000 + "\n")
    cases.file("a long key", "k" * 100_000 + ": 1\n")
    cases.file("a long value", "output: " + "o" * 100_000 + "\n")
    cases.file("a long unknown value", "method: " + "m" * 100_000 + "\n")
    cases.file("a file over the size limit", "# " + "x" * (2 << 20) + "\n")
    cases.file("a NUL in a value", 'output: "a\\0b"\n')
    cases.file("a lone surrogate", 'output: "\\udc80"\n')
    cases.file("a merge key of a scalar", "<<: 5\n")
    cases.file("a merge of a bad section", "base_values: &b {seed: x}\n<<: *b\n")
    cases.file("tabs for indentation", "train:\n\ttau: 0.5\n")
    cases.file("a control character", "seed: 1\x15\n")
    cases.file("a NUL byte", b"seed: 1\x00\n")
    cases.file("a document stream", "seed: 1\n---\nseed: 2\n")
    cases.add("a config that is a folder", ["--config", "folder", "output=out"], {"folder/x": "1"})
    cases.add("a config that is missing", ["--config", "missing.yaml", "output=out"])
    cases.add("a config of an unknown bundled name", ["--config", "baselines/nothing", "output=out"])
    cases.add("a config under ..", ["--config", "../../nothing.yaml", "output=out"])
    cases.add("a config under an unknown user", ["--config", "~nobody_smat_fuzz/x.yaml", "output=out"])
    for name in ("**", "a**", "*", "[", "?", "[!a]", ".", "..", "/", "~", "configs", "configs/", " pmf", "pmf\t",
                 "x" * 5000, "a/" * 500 + "b"):
        cases.add(f"a config named {name[:20]!r}", ["--config", name, "output=out"])


# ---------------------------------------------------------------- base: chains and config_files

def chain_cases(cases: Cases) -> None:
    for value in ("5", "[null]", "{a: 1}", "[[a]]", "''", "true", "1.5", "[5]", '"a\\0b"', "[' ']"):
        cases.file(f"base: {value}", f"base: {value}\n")
    for value in ("5", "[1]", "{a: 1}", "[null]", "true"):
        cases.file(f"config_files: {value}", f"config_files: {value}\n")
    cases.file("base: a missing file", "base: missing.yaml\n")
    cases.file("base: itself", "base: config.yaml\n")
    cases.file("base: a cycle of two", "base: other.yaml\n", **{"other.yaml": "base: config.yaml\n"})
    cases.file("base: a cycle of three", "base: b.yaml\n",
               **{"b.yaml": "base: c.yaml\n", "c.yaml": "base: [b.yaml]\n"})
    cases.file("base: a cycle through a folder", "base: sub/a.yaml\n", **{"sub/a.yaml": "base: ../config.yaml\n"})
    chain = {f"c{i}.yaml": f"base: c{i + 1}.yaml\n" for i in range(40)}
    chain["c40.yaml"] = "seed: 1\n"
    cases.file("base: a chain of 41 files", "base: c0.yaml\n", **chain)
    cases.file("base: a folder", "base: sub\n", **{"sub/x": "1"})
    cases.file("base: a file that is not UTF-8", "base: b.yaml\n", **{"b.yaml": b"seed: \xff\n"})
    cases.file("base: a file that is a list", "base: b.yaml\n", **{"b.yaml": "- 1\n"})
    cases.file("base: a file with a bad value", "base: b.yaml\n", **{"b.yaml": "train: {tau: many}\n"})
    cases.file("base: a bundled config, then a bad key", "base: pmf\nzz: 1\n")
    cases.file("base: a bundled config twice, then a bad value", "base: [pmf, baselines/pmf.yaml]\nseed: -1\n")
    cases.file("base: under an unknown user", "base: ~nobody_smat_fuzz/x.yaml\n")
    cases.file("base: a name that is ambiguous or absent", "base: [nothing_bundled]\n")


# ---------------------------------------------------------------- every field: wrong types and out of range

def leaf_fields(cls, prefix: str = ""):
    """(dotted name, type hint, default) of every non-section field of a config dataclass, recursively."""
    hints = typing.get_type_hints(cls)
    for spec in dataclasses.fields(cls):
        hint = hints[spec.name]
        if dataclasses.is_dataclass(hint):
            yield from leaf_fields(hint, f"{prefix}{spec.name}.")
        else:
            default = spec.default_factory() if spec.default_factory is not dataclasses.MISSING else spec.default
            yield prefix + spec.name, hint, default


def wrong_values(hint, default) -> list[str]:
    """YAML texts that no field of type ``hint`` may take."""
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType)
    if optional:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    values = [] if optional else ["null"]
    if hint is bool:
        values += ["2", "maybe", "[true]", "{a: 1}"]
    elif hint is int:
        values += [".nan", ".inf", "-.inf", str(2**31), str(-(2**31)), str(2**70), "1.5", "text", "[1, 2]",
                   "{a: 1}", "true", "9" * 400]
    elif hint is float:
        values += [".nan", ".inf", "-.inf", "1e400", "-1e999", "text", "[1, 2]", "{a: 1}", "true", "9" * 400]
    elif hint is str:
        values += ["5", "[a, b]", "{a: 1}", '"a\\0b"', '"\\udc80"', "x" * 5000, "true"]
        values += ['""'] if default else []
    elif typing.get_origin(hint) is list:
        element = typing.get_args(hint)[0]
        values += ["{a: 1}", "[[a]]", "[null]", "[{a: 1}]", "[true]"]
        values += ["5", "[1]"] if element is str else ["[text]", "[.nan]", "[1e400]"]
    return values


LONG_NAME = "x" * 300  # longer than any file system's names (255 bytes)
# values in the right type that validation refuses (ranges, choices, consistency, files that do not exist)
OUT_OF_RANGE = {
    "method": ["bogus"], "seed": ["-1"], "device": ["gpu", "cuda:x", "tpu"], "keep_checkpoints": ["0", "-1"],
    "output": ['""', LONG_NAME, f"a/{LONG_NAME}/b", "a/" * 2100], "model.backbone": ["vit_nonexistent_model"],
    "model.weights": ["/nonexistent/w.pth", LONG_NAME],
    "model.image_size": ["0", "-32", "5000", "33"], "model.num_experts": ["0", "33", "-1"],
    "model.expert_patterns": ["[]", "['']", "[nomatch]"], "model.log_alpha_init_std": ["-1"],
    "model.log_alpha_range": ["[1, 0]", "[1]", "[1, 2, 3]", "[]"], "model.hyper_tokens": ["0", "2000"],
    "model.hyper_heads": ["0", "300"], "model.hyper_mlp_ratio": ["0", "100"], "model.protonet_scale": ["0"],
    "model.pmf_head": ["bogus"], "model.backend": ["bogus"], "model.builtin.patch_size": ["0", "5"],
    "model.builtin.embed_dim": ["0", "130", "20000"], "model.builtin.depth": ["0", "300"],
    "model.builtin.num_heads": ["0", "3", "2000"], "model.builtin.mlp_ratio": ["0", "-1", "100"],
    "model.builtin.stem": ["bogus"], "model.builtin.stem_width": ["0", "5000"],
    "pretrain.epochs": ["0"], "pretrain.batch_size": ["0", "100000"], "pretrain.lr": ["0", "-1"],
    "pretrain.weight_decay": ["-1"], "pretrain.label_smoothing": ["1.0", "-0.1"],
    "pretrain.warmup_fraction": ["1.0", "-0.1"], "pretrain.held_out_per_class": ["-1"],
    "data.source": ["bogus"], "data.root": ["/nonexistent/data", LONG_NAME],
    "data.train_domains": ["[]", "[nowhere]"],
    "data.test_domains": ["[]", "[nowhere]"], "data.splits": ["/nonexistent/splits.json", LONG_NAME],
    "data.test_only": ["[x]"], "data.test_folders": ["[/nonexistent/folder]", f"[{LONG_NAME}]"],
    "data.protocol": ["bogus"],
    "data.n_way": ["0", "1", "20000"], "data.k_shot": ["0", "20000"], "data.q_query": ["0", "20000"],
    "data.num_workers": ["-1", "2000"], "data.train_crop_scale": ["[0, 1]", "[0.9, 0.5]", "[0.5, 2]", "[1]"],
    "data.train_jitter": ["-1"], "train.epochs": ["0"], "train.tasks_per_epoch": ["0"],
    "train.meta_batch": ["0", "5000"], "train.tau": ["1.0", "-0.1", "2"], "train.inner_lr": ["-1"],
    "train.inner_steps": ["-1", "20000"], "train.teacher_lr": ["-1"], "train.teacher_steps": ["-1", "20000"],
    "train.ce_weight": ["1.5", "-0.5"], "train.kd_temperature": ["0"], "train.kd_pretrained_share": ["2"],
    "train.kd_direction": ["bogus"], "train.teacher_start": ["bogus"], "train.noise": ["bogus"],
    "train.lambda_lr": ["0"], "train.constraint_on": ["bogus"], "train.delta_lr": ["0", "-1"],
    "train.delta_weight_decay": ["-1"], "train.delta_momentum": ["-0.1", "1.0"], "train.mask_lr": ["0"],
    "train.mask_clip": ["0"], "train.hyper_lr": ["0"],
    "train.hyper_weight_decay": ["-1"], "train.hyper_clip": ["0"], "train.hyper_penalty": ["-1"],
    "train.temperature.start": ["0", "0.1"], "train.temperature.end": ["0", "10"],
    "train.temperature.tasks_per_unit": ["0"], "train.warmup_fraction": ["1.0", "-0.1"],
    "train.lr_schedule": ["hourly"], "train.warmup_epochs": ["-1"], "train.schedule_epochs": ["0"],
    "train.first_epoch_lr": ["-1"], "train.precision": ["fp8"], "train.task_parallel": ["bogus"],
    "train.val_episodes": ["-1"], "train.max_nonfinite": ["0"], "train.log_every": ["0"],
    "train.alignment_every": ["-1"], "evaluate.episodes": ["0"], "evaluate.seed": ["-1"],
}
# fields (besides flags) whose every value of the right type is a valid one (wrong types are still refused)
ANY_VALUE = {"config_files", "model.log_alpha_init_mean"}


def field_cases(cases: Cases) -> None:
    for name, hint, default in leaf_fields(Config):
        for value in wrong_values(hint, default) + OUT_OF_RANGE.get(name, []):
            cases.override(f"{name}={value[:40]}", f"{name}={value}")
        if len(wrong_values(hint, default)) and name in ("seed", "train.tau", "model.expert_patterns", "output"):
            for value in wrong_values(hint, default)[:4]:  # the same values from a file
                cases.file(f"{name}: {value[:40]} (file)", yaml.safe_dump(_nested(name, yaml.safe_load(value))))
    for text in ("train", "model=5", "model.builtin=[1]", "train.tau.x=1", "=5", "a..b=1", "train.=1",
                 ".seed=1", "seed=[", "seed={", "seed=*x", "seed=&a [*a]", "seed=!!python/name:os.system",
                 "train={tau: 0.5, tau: 0.9}", "model.expert_patterns=" + "[" * 3000):
        cases.override(f"override {text[:40]}", text)


def _nested(name: str, value):
    nested: dict = {}
    cursor = nested
    *sections, key = name.split(".")
    for section in sections:
        cursor = cursor.setdefault(section, {})
    cursor[key] = value
    return nested


def test_every_field_is_fuzzed():
    names = {name for name, _, _ in leaf_fields(Config)}
    assert not set(OUT_OF_RANGE) - names, "OUT_OF_RANGE names a field the config does not have"
    assert not ANY_VALUE - names, "ANY_VALUE names a field the config does not have"
    missing = sorted(name for name, hint, _ in leaf_fields(Config)
                     if name not in OUT_OF_RANGE and name not in ANY_VALUE and hint not in (bool,))
    assert not missing, f"fields without out-of-range values in the fuzzer: {missing}"


def test_config_fuzzer(tmp_path):
    """Every case: exit 2, one bounded `error:` line, no traceback, nothing written (about 1,100 cases)."""
    cases = Cases(tmp_path / "cases")
    rng = random.Random(SEED)
    structure_cases(cases, rng)
    chain_cases(cases)
    field_cases(cases)
    for text in ("train.tau=2", "seed=x", "data.n_way=1"):  # the plan commands check every run's config
        cases.add(f"study {text}", ["--dry-run", text, "--output", "out"], module="smat.study")
        cases.add(f"reproduce {text}", ["table1", "--dry-run", "--step-seconds", "1", "--output", "out", text],
                  module="smat.reproduce")
    results = run_batch(cases.cases, tmp_path)
    check_all(cases.cases, results)


def test_the_real_entry_point_on_the_worst_files(tmp_path):
    """``python -m smat.train`` itself (not main() in a batch): a billion laughs, bytes that are not UTF-8, a
    duplicate key. One line each, bounded, fast, and no run folder."""
    files = {"laughs.yaml": laughs(12, 10) + "seed: *a11\n", "binary.yaml": b"seed: \xff\xfe\x00\n",
             "duplicate.yaml": "seed: 1\ntrain:\n  tau: 0.5\nseed: 2\n"}
    for name, content in files.items():
        (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
        finished = subprocess.run([sys.executable, "-m", "smat.train", "--config", name, "output=out"], cwd=tmp_path,
                                  capture_output=True, text=True, timeout=120,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"})
        lines = finished.stderr.splitlines()
        assert finished.returncode == 2 and len(lines) >= 1 and lines[0].startswith("error:"), finished.stderr
        assert all(len(line) <= LINE_LIMIT for line in lines) and "Traceback" not in finished.stderr
        assert not (tmp_path / "out").exists()
    assert "duplicate key 'seed'" in finished.stderr and "line 4" in finished.stderr


# ---------------------------------------------------------------- the named cases of issue 22, item 5, 6 and 10

def train_main(argv, capsys) -> tuple[int, str]:
    from smat.train import main

    code = main(argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("text, words", [
    ("base: 5\n", "base: must be a file name or a list of file names; got 5"),
    ("base: [null]\n", "base: must be a file name or a list of file names; got [None]"),
    ("config_files: 5\n", "config_files: must be a file name or a list of file names"),
    ("1: 2\n", "config key 1 under the top level is not a name"),
    ("seed: 1\nmodel:\n  num_experts: 2\nseed: 3\n", "found duplicate key 'seed' (first given on line 1)"),
])
def test_issue_config_files(text, words, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    Path("config.yaml").write_text(text)
    code, err = train_main(["--config", "config.yaml", "output=run"], capsys)
    assert code == 2 and err.startswith("error:") and words in err, err
    assert not Path("run").exists()


def test_duplicate_keys_name_the_key_and_both_lines(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("train:\n  tau: 0.5\n  epochs: 1\n  tau: 0.9\n")
    with pytest.raises(config_module.ConfigError) as error:
        config_module.load_config(path)
    message = str(error.value)
    assert "duplicate key 'tau' (first given on line 2)" in message and "line 4" in message


def test_yaml_merge_keys_may_still_be_overridden(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("train:\n  <<: {tau: 0.5, epochs: 1}\n  tau: 0.7\n")
    config = config_module.load_config(path)
    assert config.train.tau == 0.7 and config.train.epochs == 1


@pytest.mark.parametrize("override, words", [
    ("model.log_alpha_range=[1,b]", "model.log_alpha_range must be a list of finite numbers; got [1.0, 'b']"),
    ("model.expert_patterns=[nomatch]", "no backbone parameter matches model.expert_patterns=['nomatch']"),
    ("seed=99999999999999999999", "seed must be an integer of magnitude at most 2147483647"),
    ("seed=-1", "seed must be a non-negative integer"),
    ("model.weights=5", "model.weights must be a string or null; got 5"),
    ("train.epochs=1e100", "train.epochs must be an integer"),
])
def test_issue_config_values(override, words, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, err = train_main([override, "output=run"], capsys)
    assert code == 2 and err.startswith("error:") and words in err, err
    assert "Traceback" not in err and not Path("run").exists()


@pytest.mark.parametrize("override, environment", [("model.backend=triton", {}), ("model.backend=cuda", {}),
                                                   ("seed=1", {"SMAT_BACKEND": "bogus"})])
def test_a_backend_that_cannot_run_here_stops_before_the_run_folder(override, environment, tmp_path, monkeypatch,
                                                                    capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is visible here: the backends may run")
    from smat_kernels import dispatch

    if override == "model.backend=triton" and dispatch.rejection("triton", torch.device("cpu")) is None:
        pytest.skip("Triton's interpreter runs here (TRITON_INTERPRET=1 was set when the kernels were imported)")
    monkeypatch.chdir(tmp_path)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    code, err = train_main([override, "output=run", "device=cpu"], capsys)
    assert code == 2 and err.startswith("error:") and "cannot run on cpu" in err, err
    assert not Path("run").exists()


def test_an_expanding_value_gives_a_short_message_quickly(tmp_path, monkeypatch, capsys):
    """Item 6: 400 bytes of anchors that expand to 10^12 values; the rejection is one short message."""
    monkeypatch.chdir(tmp_path)
    Path("config.yaml").write_text(laughs(12, 10) + "model: {expert_patterns: *a11}\n")
    code, err = train_main(["--config", "config.yaml", "output=run"], capsys)
    assert code == 2 and len(err) < 1000 and "anchors and aliases" in err, err


def test_every_error_line_is_bounded():
    long = "x" * 100_000
    error = config_module.ConfigError(f"first {long}\nsecond\n" + "more\n" * 500)
    lines = str(error).splitlines()
    assert all(len(line) <= config_module.LINE_LIMIT for line in lines) and len(lines) <= config_module.MAX_LINES
    assert lines[0].startswith("first xxx") and " … " in lines[0] and lines[1] == "second"
    assert len(config_module.short(list(range(10**6)))) < 200
    assert len(config_module.short({"a": [[["deep"] * 100] * 100] * 100})) < 200


def test_unusable_test_folders_are_found_before_training(tmp_path, monkeypatch, capsys):
    """Item 8: a data.test_folders folder without images (or with too few classes) stops the command before it
    trains or creates the run folder."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty" / "a").mkdir(parents=True)
    few = tmp_path / "few" / "only_class"
    few.mkdir(parents=True)
    from PIL import Image

    for index in range(3):
        Image.new("RGB", (8, 8), (index, 0, 0)).save(few / f"{index}.png")
    for folder in ("empty", "few"):
        code, err = train_main([f"data.test_folders=[{folder}]", "output=run"], capsys)
        assert code == 2 and err.startswith("error:"), err
        assert not Path("run").exists()


def test_every_adaptation_option_with_a_wrong_value_is_one_config_error():
    """The adapt.* options of smat.evaluate and smat.predict: wrong types, NaN, inf, huge integers."""
    from smat.adapt import AdaptConfig
    from smat.predict import adapt_options

    for name, hint, default in leaf_fields(AdaptConfig):
        for value in wrong_values(hint, default):
            with pytest.raises(config_module.ConfigError) as error:
                adapt_options([f"adapt.{name}={value}"])
            assert all(len(line) <= LINE_LIMIT for line in str(error.value).splitlines()), (name, value)
