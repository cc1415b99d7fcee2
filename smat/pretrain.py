"""``python -m smat.pretrain``: pre-train the built-in backbone and write its weights with a record.

The package ships the weights that this command wrote with the default settings
(``smat/model/weights/builtin_vit.safetensors``), so that a run needs no
pre-training and every machine starts from the same backbone. Re-create them with

    python -m smat.pretrain --output smat/model/weights/builtin_vit.safetensors

Beside the weights, a JSON record holds the settings' key, the command, the
accuracy on held-out images of the pre-training classes, the machine (CPU, ISA,
threads, torch version) and the file's SHA-256, which the package checks before
it uses a shipped file. Without ``--output`` the weights go to the cache that
``python -m smat.train pretrain.use_shipped=false`` (or ``--pretrain``) reads.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from .config import ConfigError, load_config, validate
from .data import DataError
from .runtime.io import OutputError, describe_os_error, ensure_writable_dir
from .training.pretrain import cached_weights, pretrain_to_file


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m smat.pretrain", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", action="append", help="YAML config (default: the built-in default run's)")
    parser.add_argument("--output", metavar="FILE.safetensors",
                        help="where to write the weights (default: the cache that smat.train reads)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. pretrain.epochs=2")
    return parser.parse_intermixed_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    try:
        config = validate(load_config(args.config, args.overrides))
        if config.model.backbone != "builtin":
            raise ConfigError(f"smat.pretrain trains the built-in backbone; model.backbone is "
                              f"{config.model.backbone!r}")
        output = Path(args.output).expanduser() if args.output else cached_weights(config)
        if output.suffix != ".safetensors":
            raise ConfigError(f"--output {output} must name a .safetensors file")
        ensure_writable_dir(output.parent)
        summary = pretrain_to_file(config, output, "python -m smat.pretrain " + shlex.join(argv), log=print)
    except KeyboardInterrupt:
        print("interrupted; nothing was written", file=sys.stderr)
        return 130
    except (ConfigError, DataError, OutputError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"error: {describe_os_error(error, Path(error.filename or '.'))}", file=sys.stderr)
        return 2
    print(f"pre-trained in {summary['seconds']} s: held-out accuracy {summary['held_out_accuracy']:.4f}; "
          f"wrote {output} and {output.with_suffix('.json').name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
