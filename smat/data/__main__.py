"""``python -m smat.data``: list and build the built-in domains, draw episodes.

    python -m smat.data list
    python -m smat.data build [--rebuild]
    python -m smat.data show DOMAIN [--split test] [--way 5 --shot 5 --query 5 | --variable]
                             [--size 64] [--seed 0] [--folder ROOT | --h5 ROOT] [--out FILE.png]
    python -m smat.data overview [--out FILE.png]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from . import builtin
from .folder import ImageFolderSource
from .groups import label
from .h5 import MetaDatasetH5Source
from .loader import EpisodeDataset
from .samplers import make_sampler
from .show import domain_strip, episode_grid, stack_vertically
from .transforms import EvalTransform


def _source(args):
    if args.folder:
        return ImageFolderSource(args.folder, size_hint=args.size)
    if args.h5:
        return MetaDatasetH5Source(args.h5)
    return builtin.BuiltinSource(args.domain)


def show(args) -> Path:
    source = _source(args)
    domain = source[args.domain]
    split = args.split or next(s for s in ("test", "val", "train") if domain.classes(s))
    if args.variable:
        sampler = make_sampler(source, args.domain, split, "variable")
    else:
        sampler = make_sampler(source, args.domain, split, "fixed", n_way=args.way, k_shot=args.shot,
                               q_query=args.query)
    task = EpisodeDataset(source, sampler, EvalTransform(args.size, crop_fraction=1.0), seed=args.seed)[0]
    out = Path(args.out or f"episode_{args.domain}.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    episode_grid(task).save(out, optimize=True)
    print(f"{out}: {task.domain} ({split}), {task.n_way}-way, {len(task.support_y)} support, "
          f"{len(task.query_y)} query images")
    return out


def overview(args) -> Path:
    """Every built-in domain as one labelled row: two images each of several classes."""
    source = builtin.BuiltinSource()
    rng = np.random.default_rng(args.seed)
    strips = []
    for name in source:
        domain = source[name]
        classes = rng.choice(len(domain.class_names), size=min(7, len(domain.class_names)), replace=False)
        images = [domain.load(int(c), i) for c in classes for i in range(2)]
        group = label(builtin.DOMAINS[name].group) if name != builtin.PRETRAIN_DOMAIN else "pre-training"
        strips.append(domain_strip(f"{name} ({group})", np.stack(images), args.size, label_width=175))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stack_vertically(strips).save(out, optimize=True)
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
    show_parser.add_argument("--way", type=int, default=5)
    show_parser.add_argument("--shot", type=int, default=5)
    show_parser.add_argument("--query", type=int, default=5)
    show_parser.add_argument("--variable", action="store_true", help="Meta-Dataset variable-way variable-shot")
    show_parser.add_argument("--size", type=int, default=64)
    show_parser.add_argument("--seed", type=int, default=0)
    show_parser.add_argument("--folder", help="image-folder root instead of the built-in data")
    show_parser.add_argument("--h5", help="Meta-Dataset .h5 root instead of the built-in data")
    show_parser.add_argument("--out", help="PNG path (default episode_DOMAIN.png)")
    overview_parser = commands.add_parser("overview", help="one picture of all built-in domains")
    overview_parser.add_argument("--out", default="builtin_domains.png")
    overview_parser.add_argument("--size", type=int, default=40)
    overview_parser.add_argument("--seed", type=int, default=0)
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
    except (FileNotFoundError, ValueError, KeyError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
