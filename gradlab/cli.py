"""The ``gradlab`` command line.

Every user error is one line on stderr (``FILE:LINE: key.path: message`` for configs) and a
non-zero exit status: 2 for bad input (config, data, device, run directory), 3 for a run
stopped by NaN/Inf, 130 for Ctrl-C. Set ``GRADLAB_DEBUG=1`` to see tracebacks of internal errors.
"""

from __future__ import annotations

import argparse
import os
import re
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# What TensorFlow's C++ runtime prints while it loads, before absl's logging is initialised and
# so whatever TF_CPP_MIN_LOG_LEVEL says (TF 2.21; e.g. "I0000 ... port.cc:153] oneDNN custom
# operations are on" on CPUs with AVX-512): absl's notice, and log lines "<L>MMDD hh:mm:ss.us
# thread file:line] message" with L one of I, W, E, F (TF_CPP_MIN_LOG_LEVEL 0-3 hides I, W, E).
_ABSL_NOTICE = "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
_LOG_LINE = re.compile(r"^([IWEF])\d{4} [\d:.]+\s+\d+ \S+:\d+\] ")  # (before init the time reads 00:00:<epoch s>)


def _shown_at_log_level(lines: list[str], level: int) -> list[str]:
    """``lines`` without the TensorFlow load-time log lines that TF_CPP_MIN_LOG_LEVEL ``level``
    hides (with any level above 0, absl's notice too, also where it shares a line with the next
    message: it has been seen written without its newline)."""
    kept = []
    for line in lines:
        if level >= 1 and _ABSL_NOTICE in line:
            line = line.replace(_ABSL_NOTICE, "")
            if not line:
                continue
        match = _LOG_LINE.match(line)
        if match is None or "IWEF".index(match.group(1)) >= level:
            kept.append(line)
    return kept


def _import_tensorflow() -> None:
    """Import TensorFlow and Keras with the lines its C++ runtime prints to stderr while loading
    filtered by TF_CPP_MIN_LOG_LEVEL (default 3 here: fatal errors only), which TensorFlow itself does not
    apply before absl is initialised. Anything else printed meanwhile is passed on, in order. So a
    user error stays the one line the CLI promises. Does nothing if TensorFlow is imported already."""
    if "tensorflow" in sys.modules:
        return
    try:
        level = int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
    except ValueError:
        level = 0
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # no real stderr (embedded, captured): nothing to filter
        fd = None
    if level <= 0 or fd is None:
        import keras  # noqa: F401
        import tensorflow  # noqa: F401
        return
    import tempfile

    sys.stderr.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), fd)
        try:
            import keras  # noqa: F401
            import tensorflow  # noqa: F401
        finally:
            sys.stderr.flush()
            os.dup2(saved, fd)
            os.close(saved)
            captured.seek(0)
            lines = captured.read().decode("utf-8", "replace").splitlines()
            kept = _shown_at_log_level(lines, level)
            if kept:
                sys.stderr.write("\n".join(kept) + "\n")
                sys.stderr.flush()


class _Parser(argparse.ArgumentParser):
    """An argument error is one line, ``gradlab CMD: error: ... (usage: ...)``, exit status 2."""

    def error(self, message: str):
        usage = " ".join(self.format_usage().split()).removeprefix("usage: ")
        self.exit(2, f"{self.prog}: error: {message} (usage: {usage})\n")


class _CommandParser(_Parser):
    """A subcommand's parser: options and positionals mix freely (``check CFG --batch 4 key=value``).

    argparse's plain parsing ends the ``nargs="*"`` overrides at the first option, so an override
    after an option was an "unrecognized argument"; :meth:`parse_known_intermixed_args` parses the
    options first, then every positional. Leftovers are an error of this subcommand."""

    _nested = False

    def parse_known_args(self, args=None, namespace=None):
        if self._nested:  # parse_known_intermixed_args calls back here for its two passes
            return super().parse_known_args(args, namespace)
        self._nested = True
        try:
            namespace, extras = self.parse_known_intermixed_args(args, namespace)
        finally:
            self._nested = False
        if extras:  # an unknown option also leaves the positionals after it: name the option only
            self.error(f"unrecognized arguments: {' '.join([e for e in extras if e.startswith('-')] or extras)}")
        return namespace, extras


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="gradlab", description="Make gradients visible in TensorFlow/Keras training.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_CommandParser)

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
    _add_compare_parsers(sub)
    return p


def _cmd_run(args) -> int:
    from gradlab.experiment import run

    if args.resume is None and args.config is None:
        from gradlab.errors import RunDirError

        raise RunDirError("gradlab run: give a config file, or --resume RUN_DIR")
    run(args.config, args.overrides, run_dir=args.run_dir, resume=args.resume, verbose=0 if args.quiet else "auto")
    return 0


def _cmd_validate(args) -> int:
    from gradlab.config import apply_overrides, load_config, load_raw
    from gradlab.errors import ConfigError

    raw, _, _ = load_raw(args.config)
    data, _ = apply_overrides(raw, list(args.overrides))
    if not (isinstance(data, dict) and data.get("sweep") is not None):
        exp = load_config(args.config, args.overrides)
        print(f"{args.config}: ok ({exp.model.kind} on {exp.data.name}, loss {exp.train.loss}, "
              f"{exp.train.epochs} epochs)")
        return 0
    # A sweep config: check every combination as gradlab sweep does. The base alone need not be a
    # valid experiment (a swept section may complete it); a problem of the base that every
    # combination keeps is reported by the plan, once, at its YAML line.
    from gradlab.sweep import plan

    p = plan(args.config, fixed=args.overrides)
    try:
        exp = load_config(args.config, args.overrides)
        what = f"{exp.model.kind} on {exp.data.name}, loss {exp.train.loss}, {exp.train.epochs} epochs; "
    except ConfigError:
        what = ""
    print(f"{args.config}: ok ({what}sweep: {len(p.combinations)} combinations ok)")
    return 0


def _cmd_schema(args) -> int:
    from gradlab.config import dump_schema

    print(dump_schema())
    return 0


COMMANDS = {"run": _cmd_run, "validate": _cmd_validate, "schema": _cmd_schema}


# --- compare: sweep, check, report, tensorboard (issue 5) -------------------------------------

def _add_compare_parsers(sub) -> None:
    s = sub.add_parser("sweep", help="run a grid of experiments and compare them (HParams, table)")
    s.add_argument("config", help="experiment YAML file (its `sweep:` section is the grid)")
    s.add_argument("axes", nargs="*", metavar="key.path=a,b,c", help="sweep axes; one value fixes a key")
    s.add_argument("--jobs", type=int, default=1, help="runs in parallel (separate processes; default 1)")
    s.add_argument("--sweep-dir", help="write the sweep here (absent or empty) instead of log_dir/<name>-sweep-<time>")
    s.add_argument("--timeout", type=float, help="seconds one run may take before it is stopped and marked failed")
    s.add_argument("--quiet", action="store_true", help="no progress lines and no table")

    c = sub.add_parser("check", help="numeric gradient check of the configured model and loss (float64)")
    c.add_argument("config")
    c.add_argument("overrides", nargs="*", metavar="key.path=value")
    c.add_argument("--tolerance", type=float, default=None, help="largest max relative error that passes (1e-4)")
    c.add_argument("--batch", type=int, default=None, help="samples in the checked batch (8)")
    c.add_argument("--max-entries", type=int, default=None,
                   help="entries checked per variable at most, a fixed random subset (512; 0 = all)")

    r = sub.add_parser("report", help="draw loss, gradient norms, activation health and verdicts to a PNG")
    r.add_argument("path", metavar="RUN_OR_SWEEP_DIR")
    r.add_argument("--out", help="PNG file to write (default: RUN_OR_SWEEP_DIR/report.png)")

    t = sub.add_parser("tensorboard", help="launch TensorBoard on 127.0.0.1 for a run or sweep directory")
    t.add_argument("path", metavar="RUN_OR_SWEEP_DIR")
    t.add_argument("--port", type=int, default=6006, help="port on 127.0.0.1 (default 6006)")


def _cmd_sweep(args) -> int:
    from gradlab.sweep import plan, run_sweep

    p = plan(args.config, args.axes)
    if args.timeout is not None and not args.timeout > 0:
        from gradlab.errors import UsageError

        raise UsageError(f"--timeout ({args.timeout:g}) must be a positive number of seconds")
    result = run_sweep(p, sweep_dir=args.sweep_dir, jobs=args.jobs, quiet=args.quiet, timeout=args.timeout)
    if result.failed:
        print(f"gradlab sweep: {len(result.failed)} of {len(result.runs)} runs failed "
              f"(see {result.sweep_dir}/sweep.json)", file=sys.stderr)
        return 1
    return 0


def _cmd_check(args) -> int:
    from gradlab import gradcheck
    from gradlab.config import load_config
    from gradlab.errors import UsageError

    tolerance = gradcheck.DEFAULT_TOLERANCE if args.tolerance is None else args.tolerance
    if not tolerance > 0:
        raise UsageError(f"--tolerance ({tolerance:g}) must be a positive number, such as 1e-4")
    batch = gradcheck.DEFAULT_BATCH if args.batch is None else args.batch
    if batch < 1:
        raise UsageError(f"--batch ({batch}) must be a positive integer")
    max_entries = gradcheck.DEFAULT_MAX_ENTRIES if args.max_entries is None else args.max_entries
    if max_entries < 0:
        raise UsageError(f"--max-entries ({max_entries}) must be 0 (all entries) or a positive integer")
    exp = load_config(args.config, args.overrides)
    result = gradcheck.check_config(exp, batch=batch, tolerance=tolerance, max_entries=max_entries)
    print(f"{args.config}: {exp.model.kind}" + (f" {list(exp.model.hidden)} {exp.model.activation}"
                                                if exp.model.kind == "mlp" else "")
          + f", loss {exp.train.loss} ({exp.train.reduction})")
    kinks = exp.model.kind == "mlp" and bool(exp.model.hidden) and exp.model.activation in ("relu", "leaky_relu")
    print(gradcheck.format_result(result, kinks=kinks))
    return 0 if result.passed else 1


def _cmd_report(args) -> int:
    from gradlab.report import report

    result = report(args.path, args.out)
    print(f"report: {result.path} ({result.size[0]}x{result.size[1]} pixels)")
    return 0


def _cmd_tensorboard(args) -> int:
    from gradlab.tb import launch

    return launch(args.path, args.port)


COMMANDS.update(sweep=_cmd_sweep, check=_cmd_check, report=_cmd_report, tensorboard=_cmd_tensorboard)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``gradlab`` console script; returns the exit status."""
    try:
        args = _parser().parse_args(argv)
    except KeyboardInterrupt:
        print("gradlab: interrupted", file=sys.stderr)
        return 130
    from gradlab.errors import GradlabError, first_line

    previous = {}
    try:
        if args.command == "run":  # SIGTERM/SIGHUP: interrupted (and resumable), as with Ctrl-C, from here on
            from gradlab.resume import stop_signals_interrupt

            previous = stop_signals_interrupt()
        if args.command != "schema":  # every other command loads TensorFlow (or TensorBoard, which does)
            _import_tensorflow()
        return COMMANDS[args.command](args)
    except GradlabError as err:
        print(str(err), file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("gradlab: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # an internal error: one line unless debugging
        if os.environ.get("GRADLAB_DEBUG", "").strip().lower() not in ("", "0", "false", "no"):
            raise
        print(f"gradlab: internal error: {type(err).__name__}: {first_line(err) if str(err) else ''} "
              "(set GRADLAB_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1
    finally:
        if previous:
            from gradlab.resume import restore_handlers

            restore_handlers(previous)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
