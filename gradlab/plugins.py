"""Plug-ins by name: diagnostics (``diagnostics:``) and arbitrary Keras callbacks (``callbacks:``).

A diagnostic ``type`` is looked up, in order, among:

1. gradlab's own diagnostics and any class decorated with ``@gradlab.callbacks.register(name)``;
2. installed packages' entry points in the group ``gradlab.diagnostics``;
3. an import path ``package.module:ClassName`` naming a :class:`gradlab.callbacks.Diagnostic`.

Options are the class's keyword arguments; they are checked against its signature and by
constructing it (constructors validate and raise ``ValueError`` naming the argument), so a bad
option is reported with its YAML line before any training starts.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import re
from importlib import metadata
from typing import Any

from gradlab.config import CallbackSpec, DiagnosticSpec, Experiment, round_to_execution, schedule_problem
from gradlab.errors import first_line

DEFAULT_DIAGNOSTICS: tuple[dict, ...] = (
    {"type": "gradient_stats", "every": 10},
    {"type": "activation_saturation", "every": 100},
    {"type": "nonfinite"},
    {"type": "health"},
)
INJECTED = ("log_dir",)


def default_specs(steps_per_execution: int = 1) -> tuple[DiagnosticSpec, ...]:
    """The diagnostics a run gets when its config has no ``diagnostics`` key (their ``every``
    rounded up to a multiple of ``steps_per_execution``: see :func:`gradlab.config.schedule_problem`)."""
    return tuple(DiagnosticSpec(type=d["type"], options={k: round_to_execution(v, steps_per_execution)
                                                         if k == "every" else v for k, v in d.items() if k != "type"})
                 for d in DEFAULT_DIAGNOSTICS)


IMPORT_PATH = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$")


def import_object(path: str) -> Any:
    """Import ``package.module:Name``; raises ``ImportError``/``AttributeError`` with a clear message."""
    module_name, _, attr = path.partition(":")
    if not IMPORT_PATH.match(path):
        raise ImportError("expected 'package.module:Name'")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise
    except Exception as err:  # the module itself failed (syntax error, an exception at import)
        raise ImportError(f"importing {module_name!r} raised {type(err).__name__}: {first_line(err)}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise AttributeError(f"module {module_name!r} has no attribute {attr!r}") from None


def available_diagnostics() -> dict[str, Any]:
    """``{type name: class or entry point}`` of every diagnostic selectable by name."""
    import gradlab.callbacks as cb

    found: dict[str, Any] = dict(cb.registered())
    try:
        for ep in metadata.entry_points(group="gradlab.diagnostics"):
            found.setdefault(ep.name, ep)
    except Exception:  # pragma: no cover - broken metadata of some other package
        pass
    return found


def resolve_diagnostic(type_name: str):
    """The diagnostic class for ``type_name``; ``LookupError`` lists the available names."""
    from gradlab.callbacks import Diagnostic

    if ":" in type_name:
        try:
            cls = import_object(type_name)
        except (ImportError, AttributeError) as err:
            raise LookupError(f"cannot import {type_name!r} ({err})") from None
    else:
        table = available_diagnostics()
        if type_name not in table:
            close = difflib.get_close_matches(type_name, list(table), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise LookupError(f"{type_name!r} is not one of {', '.join(sorted(table))}{hint}; "
                              "or give an import path 'package.module:ClassName'")
        cls = table[type_name]
        if isinstance(cls, metadata.EntryPoint):
            cls = cls.load()
    if not (inspect.isclass(cls) and issubclass(cls, Diagnostic)):
        raise LookupError(f"{type_name!r} is not a gradlab.callbacks.Diagnostic subclass")
    return cls


def _arg_problem(err: Exception) -> tuple[str | None, str]:
    """Map a constructor error to ``(argument name, message)``."""
    text = str(err).splitlines()[0] if str(err) else type(err).__name__
    m = re.search(r"`(\w+)`", text)
    return (m.group(1) if m else None), text


def _accepted(cls) -> tuple[set[str], bool]:
    params = inspect.signature(cls.__init__).parameters
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    names = {n for n, p in params.items() if n != "self" and p.kind in
             (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)}
    return names, var_kw


def check_specs(exp: Experiment, lines: dict[tuple, int] | None = None,
                overrides: dict[tuple, str] | None = None) -> list[tuple]:
    """Problems with the diagnostics and callbacks of ``exp``, as ``(file, line, path, message)``
    (a problem with a key set by a command-line override names the override)."""
    from gradlab.config import _Checker

    chk = _Checker(exp.source, lines or {}, overrides)

    def add(path: tuple, line: int | None, message: str):
        chk.add(path, message)  # the key's line, else its spec's (a key of a flow mapping has none of its own)

    for i, spec in enumerate(exp.diagnostics or ()):
        try:
            cls = resolve_diagnostic(spec.type)
        except LookupError as err:
            add(("diagnostics", i, "type"), spec.line, str(err))
            continue
        spe = exp.train.steps_per_execution
        for name in getattr(cls, "schedule_options", ()):
            value = spec.options.get(name)
            problem = schedule_problem(value, spe) if type(value) is int else None
            if problem:
                add(("diagnostics", i, name), spec.line, problem)
        try:
            instantiate_diagnostic(cls, spec, steps_per_execution=spe, log_dir=None)
        except _OptionError as err:
            add(("diagnostics", i) + ((err.key,) if err.key else ()), spec.line, err.message)
            # A constructor stops at its first bad argument: try the others one at a time, so
            # that every bad option is reported at once.
            for key in spec.options:
                if key == err.key:
                    continue
                try:
                    instantiate_diagnostic(cls, dataclasses.replace(spec, options={key: spec.options[key]}),
                                           steps_per_execution=spe, log_dir=None)
                except _OptionError as other:
                    if other.key == key:
                        add(("diagnostics", i, key), spec.line, other.message)
    for i, spec in enumerate(exp.callbacks):
        try:
            instantiate_callback(spec)
        except _OptionError as err:
            add(("callbacks", i) + ((err.key,) if err.key else ()), spec.line, err.message)
    return chk.problems


class _OptionError(Exception):
    def __init__(self, key: str | None, message: str):
        super().__init__(message)
        self.key, self.message = key, message


def instantiate_diagnostic(cls, spec: DiagnosticSpec, steps_per_execution: int = 1, **injected):
    """Construct ``cls`` with ``spec.options`` plus ``injected`` arguments (``log_dir``).

    A schedule option (``cls.schedule_options``) the spec leaves unset gets its default rounded
    up to a multiple of ``steps_per_execution``; a set one is checked by :func:`check_specs`.
    """
    names, var_kw = _accepted(cls)
    params = inspect.signature(cls.__init__).parameters
    rounded = {}
    for name in getattr(cls, "schedule_options", ()):
        default = params[name].default if name in params else None
        if name not in spec.options and type(default) is int:
            value = round_to_execution(default, steps_per_execution)
            if value != default:
                rounded[name] = value
    for key in spec.options:
        if key in INJECTED:
            raise _OptionError(key, "set by gradlab (the run directory); remove it")
        if key not in names and not var_kw:
            allowed = sorted(names - set(INJECTED) - {"probe_data"})
            close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise _OptionError(key, f"unknown option for {spec.type} (allowed: {', '.join(allowed)}){hint}")
    try:
        return cls(**rounded, **dict(spec.options), **injected)
    except (ValueError, TypeError) as err:
        key, message = _arg_problem(err)
        raise _OptionError(key if key in spec.options else None, message) from None


def instantiate_callback(spec: CallbackSpec):
    """Import and construct a user callback from ``callbacks:``; it must be a Keras callback."""
    import keras

    try:
        cls = import_object(spec.cls)
    except (ImportError, AttributeError) as err:
        raise _OptionError("class", f"cannot import {spec.cls!r} ({type(err).__name__}: {err})") from None
    if not (inspect.isclass(cls) and issubclass(cls, keras.callbacks.Callback)):
        raise _OptionError("class", f"{spec.cls!r} is not a keras.callbacks.Callback subclass")
    try:
        return cls(**dict(spec.args))
    except Exception as err:  # the user's constructor: name the entry, not an internal error
        what = "" if isinstance(err, (ValueError, TypeError)) else f"{type(err).__name__}: "
        raise _OptionError("args", f"{spec.cls}({', '.join(spec.args)}): {what}{first_line(err)}") from None


def build_callbacks(exp: Experiment, log_dir: str) -> tuple[list, list]:
    """``(diagnostics, user callbacks)`` for a run writing TensorBoard events to ``log_dir``."""
    spe = exp.train.steps_per_execution
    specs = exp.diagnostics if exp.diagnostics is not None else default_specs(spe)
    diagnostics = [instantiate_diagnostic(resolve_diagnostic(s.type), s, steps_per_execution=spe, log_dir=log_dir)
                   for s in specs]
    callbacks = [instantiate_callback(s) for s in exp.callbacks]
    return diagnostics, callbacks


def user_code_owners(exp: Experiment, diagnostics: list, callbacks: list) -> dict[int, str]:
    """``{id(object): config entry}`` for the user's own code in a run: every ``callbacks:`` entry,
    and every diagnostic whose class is not gradlab's (a ``diagnostics`` import path)."""
    owners = {id(cb): f"callbacks.{i} ({spec.cls})" for i, (cb, spec) in enumerate(zip(callbacks, exp.callbacks))}
    for i, (diag, spec) in enumerate(zip(diagnostics, exp.diagnostics or ())):
        if not type(diag).__module__.startswith("gradlab."):
            owners[id(diag)] = f"diagnostics.{i} ({spec.type})"
    return owners


def raise_if_user_code(err: BaseException, exp: Experiment, diagnostics: list, callbacks: list) -> None:
    """Raise :class:`~gradlab.errors.UserCodeError` (one line naming the config entry and the
    method) when ``err`` came out of the user's own code: a frame of its traceback runs a method
    of the user's callback or diagnostic *defined outside gradlab* (the innermost such frame is
    named). An error in gradlab's own code (e.g. the Diagnostic base class running for a user's
    subclass) stays gradlab's."""
    from gradlab.errors import GradlabError, UserCodeError

    if isinstance(err, GradlabError):  # already one line of its own (a full disk, a NaN stop, ...)
        return
    owners = user_code_owners(exp, diagnostics, callbacks)
    found = None
    tb = err.__traceback__
    while tb is not None and owners:
        frame = tb.tb_frame
        owner = owners.get(id(frame.f_locals.get("self")))
        module = frame.f_globals.get("__name__", "")
        if owner is not None and module != "gradlab" and not module.startswith("gradlab."):
            found = (owner, frame.f_code.co_name)
        tb = tb.tb_next
    if found is not None:
        raise UserCodeError(f"{found[0]} raised {type(err).__name__} in {found[1]}: {first_line(err)}") from err
