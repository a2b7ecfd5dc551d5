"""The ``gradlab`` command line.

Every user error is one line on stderr (``FILE:LINE: key.path: message`` for configs) and a
non-zero exit status: 2 for bad input (config, data, device, run directory), 3 for a run
stopped by NaN/Inf, 130 for Ctrl-C. Set ``GRADLAB_DEBUG=1`` to see tracebacks of internal errors.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gradlab", description="Make gradients visible in TensorFlow/Keras training.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    r = sub.add_parser("run", help="train an experiment and log diagnostics to TensorBoard")
    r.add_argument("config", nargs="?", help="experiment YAML file (omit with --resume)")
    r.add_argument("overrides", nargs="*", metavar="key.path=value", help="typed overrides, e.g. train.loss=mse")
    r.add_argument("--run-dir", help="write the run here (must be absent or empty) instead of log_dir/<name>-<time>")
    r.add_argument("--quiet", action="store_true", help="no progress output")
    r.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")

    v = sub.add_parser("validate", help="check a config (and overrides) without training")
    v.add_argument("config")
    v.add_argument("overrides", nargs="*", metavar="key.path=value")

    sub.add_parser("schema", help="print the JSON Schema of the experiment file (for editor autocompletion)")
    return p


def _cmd_run(args) -> int:
    from gradlab.experiment import run

    if args.resume is None and args.config is None:
        from gradlab.errors import RunDirError

        raise RunDirError("gradlab run: give a config file, or --resume RUN_DIR")
    run(args.config, args.overrides, run_dir=args.run_dir, resume=args.resume, verbose=0 if args.quiet else "auto")
    return 0


def _cmd_validate(args) -> int:
    from gradlab.config import load_config

    exp = load_config(args.config, args.overrides)
    print(f"{args.config}: ok ({exp.model.kind} on {exp.data.name}, loss {exp.train.loss}, "
          f"{exp.train.epochs} epochs)")
    return 0


def _cmd_schema(args) -> int:
    from gradlab.config import dump_schema

    print(dump_schema())
    return 0


COMMANDS = {"run": _cmd_run, "validate": _cmd_validate, "schema": _cmd_schema}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``gradlab`` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    from gradlab.errors import GradlabError

    try:
        return COMMANDS[args.command](args)
    except GradlabError as err:
        print(str(err), file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("gradlab: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # an internal error: one line unless debugging
        if os.environ.get("GRADLAB_DEBUG"):
            raise
        print(f"gradlab: internal error: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''} "
              "(set GRADLAB_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
