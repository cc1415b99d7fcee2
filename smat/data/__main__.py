"""``python -m smat.data``: list and build the built-in domains, draw episodes.

    python -m smat.data list
    python -m smat.data build [--rebuild]
    python -m smat.data show DOMAIN [--split test] [--way 5 --shot 5 --query 5 | --variable]
                             [--size 64] [--seed 0] [--folder ROOT | --h5 ROOT] [--out FILE.png] [--overwrite]
    python -m smat.data overview [--out FILE.png] [--overwrite]

``--out`` replaces a picture that this command wrote before; any other file only with ``--overwrite``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

from ..config import count_flag
from . import builtin
from .folder import ImageFolderSource
from .groups import label
from .h5 import MetaDatasetH5Source
from .loader import EpisodeDataset
from .samplers import make_sampler
from .show import domain_strip, episode_grid, stack_vertically
from .source import DataError
from .transforms import EvalTransform

SOFTWARE = "smat.data"  # the PNGs' tag: a picture of an earlier call is replaced without --overwrite
MAX_SIZE = 1024


def size_flag(text: str) -> int:
    value = count_flag(8)(text)
    if value > MAX_SIZE:
        raise argparse.ArgumentTypeError(f"{value} is larger than {MAX_SIZE} pixels")
    return value


def check_out(out: Path, overwrite: bool) -> Path:
    """``out`` as the PNG to write: not a folder, and not a file other than an earlier picture of this command
    (unless ``overwrite``). Checked before any work."""
    if out.is_dir():
        raise DataError(f"--out {out} is a folder; give a file name such as {out / 'episode.png'}")
    if out.suffix.lower() != ".png":
        raise DataError(f"--out {out}: the picture is a PNG; give a name ending in .png")
    if out.exists() and not overwrite:
        try:
            with Image.open(out) as existing:
                ours = existing.info.get("Software") == SOFTWARE
        except (OSError, ValueError):
            ours = False
        if not ours:
            raise DataError(f"{out} exists and is not a picture written by smat.data; choose another --out, or "
                            f"give --overwrite to replace it")
    return out


def save_picture(image: Image.Image, out: Path) -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("Software", SOFTWARE)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.save(out, format="PNG", optimize=True, pnginfo=info)


def _source(args):
    if args.folder:
        return ImageFolderSource(args.folder, size_hint=args.size)
    if args.h5:
        return MetaDatasetH5Source(args.h5)
    return builtin.BuiltinSource(args.domain)


def show(args) -> Path:
    out = check_out(Path(args.out or f"episode_{args.domain}.png").expanduser(), args.overwrite)
    source = _source(args)
    domain = source[args.domain]
    split = args.split or next(s for s in ("test", "val", "train") if domain.classes(s))
    if args.variable:
        sampler = make_sampler(source, args.domain, split, "variable")
    else:
        sampler = make_sampler(source, args.domain, split, "fixed", n_way=args.way, k_shot=args.shot,
                               q_query=args.query)
    task = EpisodeDataset(source, sampler, EvalTransform(args.size, crop_fraction=1.0), seed=args.seed)[0]
    save_picture(episode_grid(task), out)
    print(f"{out}: {task.domain} ({split}), {task.n_way}-way, {len(task.support_y)} support, "
          f"{len(task.query_y)} query images")
    return out


def overview(args) -> Path:
    """Every built-in domain as one labelled row: two images each of several classes."""
    out = check_out(Path(args.out).expanduser(), args.overwrite)
    source = builtin.BuiltinSource()
    rng = np.random.default_rng(args.seed)
    strips = []
    for name in source:
        domain = source[name]
        classes = rng.choice(len(domain.class_names), size=min(7, len(domain.class_names)), replace=False)
        images = [domain.load(int(c), i) for c in classes for i in range(2)]
        group = label(builtin.DOMAINS[name].group) if name != builtin.PRETRAIN_DOMAIN else "pre-training"
        strips.append(domain_strip(f"{name} ({group})", np.stack(images), args.size, label_width=175))
    save_picture(stack_vertically(strips), out)
    print(f"{out}: {len(strips)} domains")
    return out


def list_domains(args) -> None:
    source = builtin.BuiltinSource()
    print(f"cache: {builtin.cache_path('x').parent}")
    for name in source:
        domain, info = source[name], builtin.DOMAINS[name]
        counts = " ".join(f"{s}={len(domain.classes(s))}" for s in ("train", "val", "test"))
        images = sum(domain.num_items(c) for c in range(len(domain.class_names)))
        group = label(info.group) if info.group != "pretrain" else "pretrain"
        print(f"{name:>18} {group:>9}  {counts:<24} {images:>6} images  {info.description}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m smat.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="built-in domains, groups (ID, near-OOD, far-OOD) and class counts")
    build = commands.add_parser("build", help="generate every built-in domain into the cache")
    build.add_argument("--rebuild", action="store_true")
    show_parser = commands.add_parser("show", help="write a PNG grid of one episode")
    show_parser.add_argument("domain")
    show_parser.add_argument("--split", choices=("train", "val", "test"))
    show_parser.add_argument("--way", type=count_flag(2), default=5)
    show_parser.add_argument("--shot", type=count_flag(1), default=5)
    show_parser.add_argument("--query", type=count_flag(1), default=5)
    show_parser.add_argument("--variable", action="store_true", help="Meta-Dataset variable-way variable-shot")
    show_parser.add_argument("--size", type=size_flag, default=64, help=f"pixels per image, 8 to {MAX_SIZE}")
    show_parser.add_argument("--seed", type=count_flag(0), default=0)
    show_parser.add_argument("--folder", help="image-folder root instead of the built-in data")
    show_parser.add_argument("--h5", help="Meta-Dataset .h5 root instead of the built-in data")
    show_parser.add_argument("--out", help="PNG path (default episode_DOMAIN.png)")
    show_parser.add_argument("--overwrite", action="store_true", help="replace an --out file of another program")
    overview_parser = commands.add_parser("overview", help="one picture of all built-in domains")
    overview_parser.add_argument("--out", default="builtin_domains.png")
    overview_parser.add_argument("--size", type=size_flag, default=40, help=f"pixels per image, 8 to {MAX_SIZE}")
    overview_parser.add_argument("--seed", type=count_flag(0), default=0)
    overview_parser.add_argument("--overwrite", action="store_true", help="replace an --out file of another program")
    args = parser.parse_args(argv)
    try:
        if args.command == "list":
            list_domains(args)
        elif args.command == "build":
            builtin.build_all(rebuild=args.rebuild)
        elif args.command == "show":
            show(args)
        else:
            overview(args)
    except (FileNotFoundError, ValueError, DataError, KeyError) as error:
        print(f"error: {error.args[0] if isinstance(error, KeyError) and error.args else error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
