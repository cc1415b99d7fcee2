"""``python -m smat.predict``: classify your images with a meta-tuned model, from a few examples per class.

    python -m smat.predict --checkpoint RUN --support DIR --query DIR_OR_FILE [...] [--mode protonet|select|full|lora]
        [--output predictions.csv] [--device cpu] [adapt.key=value ...]

``--support DIR`` is ``<class>/<image>`` (as torchvision's ImageFolder has it): a few images of every class.
``--query`` takes image files and folders; a folder of ``<class>/<image>`` gives labelled queries, and then
the accuracy and a confusion matrix (PNG next to the CSV) are reported too. RUN is a run folder written
by ``python -m smat.train`` or an export written by ``python -m smat.export``. Writes a CSV of file,
predicted class and its probability (and the true class, where known); unreadable query images are
skipped, counted and listed.
"""

from __future__ import annotations

import argparse
import collections
import csv
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the backend
from PIL import Image  # noqa: E402

from .adapt import MODES, AdaptConfig, validate_adapt  # noqa: E402
from .config import (  # noqa: E402
    ConfigError,
    Once,
    device_flag,
    merge_values,
    parse_override,
    parsed_once,
    positive_flag,
)
from .data import DataError  # noqa: E402
from .inference import Predictions, load  # noqa: E402
from .inference import images as image_io  # noqa: E402
from .runtime import checkpoint  # noqa: E402
from .runtime.io import OutputError, atomic_path, holds_run  # noqa: E402

CSV_HEADER = ["file", "predicted", "probability"]
SOFTWARE = "smat.predict"  # the confusion PNG's tag: an earlier call's plot is replaced without --overwrite


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m smat.predict", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", action=Once, required=True, metavar="RUN", help="run folder or export folder")
    parser.add_argument("--support", action=Once, required=True, metavar="DIR",
                        help="<class>/<image>: examples of every class")
    parser.add_argument("--query", nargs="+", action="extend", required=True, metavar="DIR_OR_FILE",
                        help="images to classify: files, folders of images, or <class>/<image> folders")
    parser.add_argument("--mode", action=Once, default="protonet", choices=MODES,
                        help="protonet: one merge (default); select: Algorithm 2; full: Algorithm 3; lora: LoRA")
    parser.add_argument("--output", action=Once, default="predictions.csv", metavar="CSV",
                        help="default: predictions.csv; never inside a run or export folder")
    parser.add_argument("--overwrite", action="store_true", help="replace an --output file that is not an earlier "
                        "prediction's CSV")
    parser.add_argument("--device", action=Once, type=device_flag,
                        help="auto, cpu, cuda or cuda:N (default: the run's)")
    parser.add_argument("--lr", action=Once, type=positive_flag,
                        help="learning rate of --mode full/lora (default 1e-4; LoRA ×10)")
    parser.add_argument("overrides", nargs="*", metavar="adapt.key=value", help="adaptation options (adapt.steps=50)")
    args = parsed_once(parser.parse_intermixed_args(argv))
    bad = [text for text in args.overrides if not text.startswith("adapt.")]
    if bad:
        parser.error(f"only adapt.key=value options are taken here; got {' '.join(bad)}")
    return args


def adapt_options(overrides) -> AdaptConfig:
    """:class:`smat.adapt.AdaptConfig` from ``adapt.key=value`` texts."""
    options = AdaptConfig()
    for text in overrides:
        merge_values(options, parse_override(text.removeprefix("adapt.")), "adapt.")
    return validate_adapt(options)


def read_support(folder) -> tuple[list[Path], list[str]]:
    """Support images and their classes from ``<class>/<image>``; an empty class folder is a DataError."""
    classes = image_io.class_folders(folder)
    empty = [name for name, files in classes.items() if not files]
    if empty:
        raise DataError(f"support class{'es' if len(empty) > 1 else ''} {', '.join(map(repr, empty))} in {folder} "
                        f"{'have' if len(empty) > 1 else 'has'} no image; add a few images of each class or remove "
                        f"the empty folder{'s' if len(empty) > 1 else ''}"
                        f"{image_io.other_files(Path(folder).expanduser() / name for name in empty)}")
    if len(classes) < 2:
        raise DataError(f"{folder} holds {len(classes)} class folder(s); a task needs at least 2: "
                        f"give <class>/<image> with one folder per class")
    files = [path for paths in classes.values() for path in paths]
    labels = [name for name, paths in classes.items() for _ in paths]
    return files, labels


def check_output(path: Path, overwrite: bool) -> Path:
    """Refuse an output CSV inside a run or an export folder, or one that would replace a file (the CSV or its
    confusion-matrix PNG) that is not an earlier prediction's, unless ``overwrite``."""
    folder = path.parent
    if holds_run(folder) or (folder / "export.json").is_file():
        raise OutputError(f"{folder} holds a {'training run' if holds_run(folder) else 'model export'}; write the "
                          f"predictions elsewhere with --output FILE.csv")
    if path.is_dir():
        raise OutputError(f"--output {path} is a folder; give a file name such as {path / 'predictions.csv'}")
    for written, kind in ((path, "predictions CSV"), (confusion_path(path), "plot")):
        if written.exists() and not written.is_file():  # a pipe would block the check below; a device be replaced
            raise OutputError(f"{written} is not a regular file (a pipe, device or socket); give --output a file "
                              f"name such as predictions.csv")
        if written.exists() and not overwrite and not written_by_predict(written, kind == "plot"):
            raise OutputError(f"{written} exists and is not a {kind} written by smat.predict; choose another "
                              f"--output, or give --overwrite to replace it")
    return path


def confusion_path(output: Path) -> Path:
    return output.with_name(output.stem + "_confusion.png")


def written_by_predict(path: Path, plot: bool) -> bool:
    """Whether ``path`` is an earlier call's CSV (by its header) or confusion PNG (by its Software tag)."""
    try:
        if plot:
            with Image.open(path) as image:
                return image.info.get("Software") == SOFTWARE
        with path.open(newline="") as handle:
            return next(csv.reader(handle), [])[:3] == CSV_HEADER
    except (OSError, ValueError, UnicodeDecodeError, csv.Error):
        return False


def write_csv(path: Path, predictions: Predictions, truth: list[str | None]) -> None:
    with atomic_path(path) as temporary, open(temporary, "w", newline="") as handle:
        writer = csv.writer(handle)
        labelled = any(label is not None for label in truth)
        writer.writerow(CSV_HEADER + (["true"] if labelled else []))
        for name, label, confidence, true in zip(predictions.names, predictions.labels,
                                                 predictions.confidence.tolist(), truth, strict=True):
            writer.writerow([name, label, f"{confidence:.4f}"] + ([true or ""] if labelled else []))


def confusion(predicted: list[str], truth: list[str], classes) -> list[list[int]]:
    index = {name: i for i, name in enumerate(classes)}
    matrix = [[0] * len(classes) for _ in classes]
    for guess, true in zip(predicted, truth, strict=True):
        matrix[index[true]][index[guess]] += 1
    return matrix


def plot_confusion(path: Path, matrix: list[list[int]], classes, accuracy: float) -> None:
    size = max(4.0, 0.45 * len(classes) + 2)
    figure, axes = plt.subplots(figsize=(size, size))
    axes.imshow(matrix, cmap="Blues")
    axes.set_xticks(range(len(classes)), classes, rotation=90)
    axes.set_yticks(range(len(classes)), classes)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(f"accuracy {100 * accuracy:.1f}%")
    peak = max(max(row) for row in matrix) or 1
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            if count:
                axes.text(j, i, str(count), ha="center", va="center", color="white" if count > peak / 2 else "black")
    figure.tight_layout()
    with atomic_path(path, suffix=".png") as temporary:
        figure.savefig(temporary, dpi=100, format="png", metadata={"Software": SOFTWARE})
    plt.close(figure)


def summarise(predictions: Predictions, truth: list[str | None], output: Path) -> list[str]:
    """Summary lines; writes the confusion matrix PNG when queries carry their class."""
    counts = collections.Counter(predictions.labels)
    lines = [f"{len(predictions)} images classified into {len(predictions.class_names)} classes: "
             + ", ".join(f"{name} {counts[name]}" for name in predictions.class_names)]
    if predictions.skipped:
        lines.append(f"{len(predictions.skipped)} query image(s) could not be read and were skipped:")
        lines += [f"  {name}: {reason}" for name, reason in predictions.skipped]
    scored = [(guess, true) for guess, true in zip(predictions.labels, truth, strict=True)
              if true in predictions.class_names]
    unknown = sum(1 for true in truth if true is not None and true not in predictions.class_names)
    if unknown:
        lines.append(f"{unknown} labelled query image(s) of classes the support set does not have were not scored")
    if scored:
        accuracy = sum(guess == true for guess, true in scored) / len(scored)
        picture = confusion_path(output)
        matrix = confusion([g for g, _ in scored], [t for _, t in scored], predictions.class_names)
        plot_confusion(picture, matrix, predictions.class_names, accuracy)
        lines.append(f"accuracy {100 * accuracy:.2f}% on {len(scored)} labelled images; confusion matrix: {picture}")
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        options = adapt_options(args.overrides)
        output = check_output(Path(args.output).expanduser(), args.overwrite)
        support, labels = read_support(args.support)
        files, truth = image_io.query_items(args.query)
        if not files:
            raise DataError(f"no image found in {' '.join(args.query)}; give image files or folders of images"
                            f"{image_io.other_files(args.query)}")
        model = load(args.checkpoint, args.device)
        print(model.describe())
        specialist = model.specialize(support, labels, args.mode, options=options, lr=args.lr)
        predictions = specialist.predict(files)
        truth = [truth[i] for i in predictions.kept]
        if not len(predictions):
            raise DataError(f"none of the {len(files)} query images could be read: "
                            + "; ".join(f"{name}: {reason}" for name, reason in predictions.skipped[:5]))
        write_csv(output, predictions, truth)
        lines = summarise(predictions, truth, output)
    except (ConfigError, DataError, OutputError, checkpoint.CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    print(f"written: {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
