"""``flare.Cls``: classes whose methods run in Flare containers (``@app.cls()``), with
Modal's lifecycle hooks (``flare.enter``, ``flare.exit``), ``flare.method`` and typed
``flare.parameter`` fields.

Pools and dispatch. A class registers as one function (its tag is the class name) whose
code is the class itself: the runner instantiates it with the parameter values, runs its
``enter`` hooks once, then dispatches each input to the method named by the input's first
positional argument (``(method, *args)``; plain functions' payloads are unchanged). Each
distinct set of parameter values, and each ``with_options`` variant, is a separate
function of the same app, derived from the class's definition and registered by this
client the first time it is used (``Model.p<hash>``; the values travel to the runner in
the ``FLARE_CLS_PARAMS`` environment variable), so each gets its own pool of containers
and autoscaler, and the server needs nothing class-specific.

Imported inside containers (user modules decorate at import time): module level holds
only what defining a class needs.
"""

from __future__ import annotations

import os

from . import exception
from .function import Function

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, Iterator, TypeVar

    from .app import App

    F = TypeVar("F")

_PARAM_TYPES: dict[Any, str] = {str: "str", int: "int", bool: "bool", bytes: "bytes"}
_PARAM_TYPE_NAMES = {"str": str, "int": int, "bool": bool, "bytes": bytes}
# What the runner reads on the raw class (plain data only: it imports nothing of the SDK).
CLS_INFO_ATTR = "__flare_cls_info__"
PARAMS_ENV = "FLARE_CLS_PARAMS"
_NO_DEFAULT = object()


class _Parameter:
    """The value of a ``flare.parameter()`` field in the class body."""

    def __init__(self, default: Any = _NO_DEFAULT, init: bool = True) -> None:
        self.default = default
        self.init = init

    def __repr__(self) -> str:
        return "flare.parameter()" if self.default is _NO_DEFAULT else f"flare.parameter(default={self.default!r})"


def parameter(*, default: Any = _NO_DEFAULT, init: bool = True) -> Any:
    """A typed class parameter (``size: int = flare.parameter(default=3)``); types: str, int,
    bool, bytes. Each distinct set of values gets its own pool of containers."""
    return _Parameter(default, init)


def _mark(kind: str, **fields: Any) -> Callable[[F], F]:
    def wrapper(f: F) -> F:
        if isinstance(f, Function):
            raise exception.InvalidError(
                f"@flare.{kind}() marks a method of a class, not a function made by @app.function(); "
                "put the method in a class decorated with @app.cls()"
            )
        if not callable(f):
            raise exception.InvalidError(f"@flare.{kind}() must decorate a method")
        marks = dict(getattr(f, "__flare_lifecycle__", None) or {})
        marks[kind] = fields
        try:
            f.__flare_lifecycle__ = marks  # type: ignore[attr-defined]
        except AttributeError:
            raise exception.InvalidError(f"@flare.{kind}() cannot annotate this object") from None
        return f

    return wrapper


def enter(*, snap: bool = False) -> Callable[[F], F]:
    """Run this method once per container, before its first input (Modal's ``@enter``).

    Hooks run in definition order, those with ``snap=True`` first. With
    ``enable_memory_snapshot=True`` the ``snap=True`` hooks run before the container is
    checkpointed (their state is in the snapshot) and the others after every start or
    restore (docs/SNAPSHOTS.md); without it both kinds run at every container start.
    An exception fails the container's start like an import error (``init_failure``).
    """
    return _mark("enter", snap=bool(snap))


def exit() -> Callable[[F], F]:
    """Run this method when the container stops (scale-down, app stop, drain); the worker's
    grace period (3 s) bounds it. Its prints reach the app's logs."""
    return _mark("exit")


def method(*, is_generator: bool | None = None) -> Callable[[F], F]:
    """Expose this method of an ``@app.cls()`` class (``Model().predict.remote(x)``)."""
    return _mark("method")


def lifecycle_kinds(f: Any) -> list[str]:
    return sorted((getattr(f, "__flare_lifecycle__", None) or {}).keys())


def check_not_lifecycle(f: Any) -> None:
    """``@app.function`` over a method marked ``@flare.enter``/``exit``/``method``: an error."""
    kinds = lifecycle_kinds(f)
    if kinds:
        raise exception.InvalidError(
            f"@flare.{kinds[0]}() marks a method of a class; {getattr(f, '__qualname__', f)!r} is decorated "
            "with @app.function(). Put the method in a class decorated with @app.cls() instead."
        )


def _code_flags(f: Any) -> int:
    code = getattr(f, "__code__", None)
    return code.co_flags if code is not None else 0


def class_info(user_cls: type) -> dict[str, Any]:
    """Validate ``user_cls`` and describe it: parameters, hooks, methods (plain data)."""
    if not isinstance(user_cls, type):
        raise exception.InvalidError(f"@app.cls() must decorate a class, not {type(user_cls).__name__}")
    annotations: dict[str, Any] = {}
    for klass in reversed(user_cls.__mro__):
        annotations.update(getattr(klass, "__annotations__", None) or {})
    params: dict[str, dict[str, Any]] = {}
    enters: list[tuple[bool, str]] = []
    exits: list[str] = []
    methods: dict[str, dict[str, bool]] = {}
    batched: list[tuple[str, Any, dict[str, int]]] = []
    web: list[dict[str, Any]] = []
    seen: dict[str, Any] = {}
    for klass in reversed(user_cls.__mro__[:-1]):
        seen.update(klass.__dict__)
    for name, value in seen.items():
        if isinstance(value, _Parameter):
            ann = annotations.get(name)
            if isinstance(ann, str):
                ann = _PARAM_TYPE_NAMES.get(ann, ann)
            tname = _PARAM_TYPES.get(ann)
            if tname is None:
                raise exception.InvalidError(
                    f"{user_cls.__qualname__}.{name}: a flare.parameter() must be annotated with one of "
                    f"str, int, bool, bytes (got {ann!r})"
                )
            entry: dict[str, Any] = {"type": tname}
            if value.default is not _NO_DEFAULT:
                _check_param_value(user_cls.__qualname__, name, tname, value.default)
                entry["default"] = value.default
            params[name] = entry
            continue
        raw = value.__func__ if isinstance(value, (staticmethod, classmethod)) else value
        if isinstance(raw, Function):
            raise exception.InvalidError(
                f"{user_cls.__qualname__}.{name} is decorated with @app.function(); use @flare.method() in a class"
            )
        marks = getattr(raw, "__flare_lifecycle__", None) or {}
        if "enter" in marks:
            enters.append((bool(marks["enter"].get("snap")), name))
        if "exit" in marks:
            exits.append(name)
        batch = getattr(raw, "__flare_batched__", None)
        endpoint = getattr(raw, "__flare_web__", None)  # flare/web_endpoints.py's mark
        if isinstance(endpoint, dict):
            if "enter" in marks or "exit" in marks:
                raise exception.InvalidError(
                    f"{user_cls.__qualname__}.{name} is a lifecycle hook (@flare.enter/@flare.exit): it cannot be a web endpoint"
                )
            web.append({**endpoint, "method_name": name})
            if endpoint.get("kind") == "fastapi":
                marks = {**marks, "method": {}}  # a FastAPI endpoint can also be called with .remote()
        if "method" in marks or batch is not None:
            flags = _code_flags(raw)
            methods[name] = {"is_generator": bool(flags & 0x220), "is_async": bool(flags & 0x280)}
            if batch is not None:
                methods[name]["batched"] = True
                batched.append((name, raw, batch))
    # snap=True hooks first, each kind in definition order (a stable sort).
    enters.sort(key=lambda e: not e[0])
    info: dict[str, Any] = {
        "params": params,
        "enter": [n for _, n in enters],
        "enter_snap": [n for snap, n in enters if snap],
        "exit": exits,
        "methods": methods,
    }
    if batched:
        info["batched"] = _check_batched_class(user_cls.__qualname__, batched, methods)
    if web:
        info["web"] = web
    return info


def _check_batched_class(cls_name: str, batched: list[tuple[str, Any, dict[str, int]]], methods: dict[str, Any]) -> dict[str, int]:
    """Modal's rules: one batched method, and then no other method (the class's containers
    take a whole batch at once). Its ``{"max_batch_size", "wait_ms"}``."""
    from .batching import positional_count

    if len(batched) > 1:
        raise exception.InvalidError(
            f"{cls_name} has several @flare.batched() methods ({', '.join(n for n, _, _ in batched)}); a class can have only one"
        )
    name, raw, batch = batched[0]
    others = sorted(set(methods) - {name})
    if others:
        raise exception.InvalidError(
            f"{cls_name} has a @flare.batched() method ({name}), so it cannot have other methods "
            f"(found {', '.join(others)}); put them in another class"
        )
    if positional_count(raw, True) < 1:
        raise exception.InvalidError(
            f"batched method {cls_name}.{name} takes no arguments besides self; it needs at least one (a list per argument)"
        )
    return dict(batch)


def _check_param_value(cls_name: str, name: str, tname: str, value: Any) -> None:
    typ = _PARAM_TYPE_NAMES[tname]
    ok = type(value) is typ if typ in (bool, int) else isinstance(value, typ)
    if not ok:
        raise exception.InvalidError(
            f"{cls_name}.{name} is a {tname} parameter; got {type(value).__name__} {value!r}"
        )


def bind_params(cls_name: str, params: dict[str, dict[str, Any]], args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """The full parameter values of ``Cls(*args, **kwargs)`` (defaults filled in)."""
    if args:
        raise exception.InvalidError(
            f"{cls_name}() takes parameters as keyword arguments only (got {len(args)} positional)"
        )
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        names = ", ".join(sorted(params)) or "none"
        raise exception.InvalidError(f"{cls_name}() got unknown parameter(s) {', '.join(unknown)}; its parameters: {names}")
    out: dict[str, Any] = {}
    for name, p in params.items():
        if name in kwargs:
            value = kwargs[name]
        elif "default" in p:
            value = p["default"]
        else:
            raise exception.InvalidError(f"{cls_name}() is missing the parameter {name!r}")
        _check_param_value(cls_name, name, p["type"], value)
        out[name] = value
    return out


def _key(data: Any) -> str:
    import hashlib
    import pickle

    return hashlib.sha256(pickle.dumps(data, 4)).hexdigest()[:12]


class Cls:
    """A class whose methods run in Flare containers (``@app.cls()``; mirrors ``modal.Cls``).

    ``Model(size=8)`` is an instance bound to those parameter values; its methods are
    ``flare.Function``-like objects with ``.remote/.map/.starmap/.spawn/.remote_gen/.local``.
    """

    def __init__(
        self,
        user_cls: type | None,
        app: App | None,
        tag: str,
        base: Function,
        info: dict[str, Any],
        options_override: dict[str, Any] | None = None,
        lookup: tuple[str, str] | None = None,
        decorator_kwargs: dict[str, Any] | None = None,
    ) -> None:
        self._user_cls = user_cls
        self._decorator_kwargs = dict(decorator_kwargs or {})
        self._app = app
        self._tag = tag
        self._base = base
        self._info = info
        self._options_override = dict(options_override or {})
        self._lookup = lookup
        self.__flare_raw_f__ = user_cls
        if user_cls is not None:
            self.__name__ = user_cls.__name__
            self.__qualname__ = user_cls.__qualname__
            self.__module__ = user_cls.__module__
            self.__doc__ = user_cls.__doc__
        # Bound functions by (parameter values, options) key.
        self._bound: dict[str, Function] = {}

    def __repr__(self) -> str:
        return f"Cls({self._tag!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        # By reference: inside a container the class's own app finds it by its tag.
        return (_restore_cls, (self._tag, self._lookup, self._info, self._options_override))

    @classmethod
    def from_name(cls, app_name: str, name: str, *, environment_name: str | None = None) -> Cls:
        """A reference to class ``name`` of the deployed app ``app_name`` (resolved on first use)."""
        base = Function.from_name(app_name, name)
        return cls(None, None, name, base, {"params": None, "methods": None}, lookup=(app_name, name))

    def with_options(self, **options: Any) -> Cls:
        """The same class with other resource/autoscaler options (a separate pool of containers):
        ``cpu``, ``memory``, ``gpu``, ``timeout``, ``retries``, ``env``, ``min_containers``,
        ``max_containers``, ``buffer_containers``, ``scaledown_window``, ``block_network``."""
        from ._options import FunctionOptions

        allowed = {
            "cpu", "memory", "gpu", "timeout", "retries", "env", "min_containers",
            "max_containers", "buffer_containers", "scaledown_window", "block_network",
        }
        bad = sorted(set(options) - allowed)
        if bad:
            raise exception.InvalidError(f"with_options() got unknown option(s) {', '.join(bad)}; options: {', '.join(sorted(allowed))}")
        if self._lookup is not None:
            raise exception.InvalidError("with_options() needs the class's definition; it is not available for Cls.from_name() yet")
        merged = {**self._options_override, **options}
        FunctionOptions.from_decorator(**_user_options(merged))  # checks the values now
        return self._variant(merged)

    def with_concurrency(self, *, max_inputs: int, target_inputs: int | None = None) -> Cls:
        """The same class with containers that each run up to ``max_inputs`` inputs at once
        (as ``@flare.concurrent`` on the class; a separate pool of containers)."""
        from ._options import Concurrency

        Concurrency(max_inputs, target_inputs)  # checks both
        if self._lookup is not None:
            raise exception.InvalidError("with_concurrency() needs the class's definition; it is not available for Cls.from_name() yet")
        if self._info.get("batched"):
            raise exception.InvalidError(
                f"{self._tag} has a @flare.batched() method: it cannot be concurrent (use with_batching())"
            )
        return self._variant({**self._options_override, "_concurrency": (max_inputs, target_inputs)})

    def with_batching(self, *, max_batch_size: int, wait_ms: int) -> Cls:
        """The same class with another batch size and wait for its ``@flare.batched()``
        method (a separate pool of containers)."""
        from .batching import check_batching

        size, wait = check_batching(max_batch_size, wait_ms)
        if self._lookup is not None:
            raise exception.InvalidError("with_batching() needs the class's definition; it is not available for Cls.from_name() yet")
        if not self._info.get("batched"):
            raise exception.InvalidError(
                f"with_batching() changes the batching of a @flare.batched() method; {self._tag} has none"
            )
        return self._variant({**self._options_override, "_batching": (size, wait)})

    def _variant(self, options_override: dict[str, Any]) -> Cls:
        variant = Cls(self._user_cls, self._app, self._tag, self._base, self._info, options_override, None, self._decorator_kwargs)
        variant._bound = self._bound  # keyed by parameters and options: registered once per app run
        return variant

    def __call__(self, *args: Any, **kwargs: Any) -> _ClsInstance:
        params_spec = self._info.get("params")
        if params_spec is None:  # looked up by name: parameters are not known here
            if args or kwargs:
                raise exception.InvalidError(
                    f"{self._tag}(): parameters are not supported for Cls.from_name() yet; "
                    "use the default parameters, or call from the app's own process"
                )
            return _ClsInstance(self, {}, self._base)
        params = bind_params(self._tag, params_spec, args, kwargs)
        return _ClsInstance(self, params, self._bound_function(params))

    # ------------------------------------------------------------ pools

    def _is_default(self, params: dict[str, Any]) -> bool:
        spec = self._info.get("params") or {}
        return not self._options_override and all("default" in p and params[n] == p["default"] for n, p in spec.items())

    def _bound_function(self, params: dict[str, Any]) -> Function:
        if self._is_default(params):
            return self._base
        key = _key((sorted(params.items()), sorted(self._options_override.items(), key=lambda kv: kv[0]), repr(self._options_override)))
        fn = self._bound.get(key)
        if fn is None:
            fn = _BoundFunction(self, params, f"{self._tag}.p{key}")
            self._bound[key] = fn
        return fn


def _restore_cls(
    tag: str, lookup: tuple[str, str] | None, info: dict[str, Any], options_override: dict[str, Any] | None = None
) -> Cls:
    if lookup is not None:
        return Cls.from_name(*lookup)
    base = Function._new_reference(tag)
    return Cls(None, None, tag, base, info, options_override)


class _BoundFunction(Function):
    """The function of one parameter set / options variant: registered on first use."""

    def __init__(self, owner: Cls, params: dict[str, Any], tag: str) -> None:
        super().__init__(None, owner._app, tag, None)
        self._owner = owner
        self._params = params
        import _thread

        # One registration even when several threads call a new variant at once (a second
        # one would be a new version, draining the first one's containers).
        self._register_lock = _thread.allocate_lock()

    def _hydrate(self) -> str:
        with self._register_lock:
            return Function._hydrate(self)

    def _resolve(self) -> dict[str, Any]:
        app = self._owner._app
        if app is not None and app._app_id is not None and self._owner._base._tag in app._defs:
            return {"function_id": register_variant(app, self._owner, self._params, self._tag)}
        if os.environ.get("FLARE_IS_REMOTE") == "1":
            return Function._resolve(self)  # registered already by the app's process
        raise exception.ExecutionError(
            f"{self._owner._tag} with these parameters/options has not been registered: its app is not running "
            "in this process. Call it inside `with app.run():` or from a `flare run` entrypoint."
        )


def _user_options(options_override: dict[str, Any]) -> dict[str, Any]:
    """The ``with_options`` part of a variant's options (``_concurrency``/``_batching`` are
    ``with_concurrency``'s and ``with_batching``'s)."""
    return {k: v for k, v in options_override.items() if not k.startswith("_")}


def register_variant(app: App, owner: Cls, params: dict[str, Any], tag: str) -> str:
    """Register the function of ``owner`` bound to ``params`` (and its options) on the app."""
    import base64
    import copy
    import pickle

    from . import _api, _invocation
    from ._options import FunctionOptions

    base_def = app._defs[owner._base._tag]
    fdef = copy.deepcopy(base_def)
    fdef["name"] = tag
    # Web endpoints belong to the class's default pool (their URL, their label): a
    # parameter/options variant serves .remote() calls only.
    fdef.pop("web", None)
    override = owner._options_override
    user_options = _user_options(override)
    if user_options:
        opts = owner._base._options
        merged = dict(owner._decorator_kwargs)
        merged.update(user_options)
        new = FunctionOptions.from_decorator(**merged)
        if opts is not None:
            new = new.with_concurrency(opts.concurrency.max_inputs, opts.concurrency.target_inputs)
        fdef["config"] = new.to_wire()
    env = dict(fdef["config"].get("env") or {})
    conc = override.get("_concurrency")
    if conc is not None:
        fdef["config"]["max_inputs"], fdef["config"]["target_inputs"] = conc
    batch = override.get("_batching")
    if batch is not None:
        from .batching import BATCH_ENV

        # As for the class's own batching: a whole batch reaches one container.
        fdef["config"]["max_inputs"] = fdef["config"]["target_inputs"] = batch[0]
        env[BATCH_ENV] = f"{batch[0]},{batch[1]}"
    env[PARAMS_ENV] = base64.b64encode(pickle.dumps(params, 4)).decode("ascii")
    fdef["config"]["env"] = env
    resp = _invocation.client().request("POST", _api.app_functions(app._app_id or ""), {"functions": [fdef]})
    return str(resp["functions"][0]["function_id"])


class _ClsInstance:
    """``Model(size=8)``: the class bound to parameter values; methods by attribute."""

    def __init__(self, owner: Cls, params: dict[str, Any], fn: Function) -> None:
        self._owner = owner
        self._params = params
        self._fn = fn
        self._methods: dict[str, _MethodFunction] = {}
        self._local: Any = None

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._params.items())
        return f"{self._owner._tag}({args})"

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        m = self._methods.get(name)
        if m is not None:
            return m
        methods = self._owner._info.get("methods")
        web_methods = [ep.get("method_name") for ep in self._owner._info.get("web") or ()]
        if methods is not None and name not in methods and name not in web_methods:
            raise AttributeError(
                f"{self._owner._tag} has no method {name!r} (its methods: {', '.join(sorted(methods)) or 'none'}; "
                "methods need @flare.method())"
            )
        flags = (methods or {}).get(name, {})
        m = _MethodFunction(self, name, bool(flags.get("is_generator")), bool(flags.get("is_async")))
        m._batched = bool(flags.get("batched"))
        self._methods[name] = m
        return m

    def _local_instance(self) -> Any:
        """An instance in this process (``.local()``): parameters set, enter hooks run."""
        if self._local is None:
            user_cls = self._owner._user_cls
            if user_cls is None:
                raise exception.InvalidError(f"{self._owner._tag} was looked up by name; its code is not available here")
            obj: Any = object.__new__(user_cls)
            for k, v in self._params.items():
                setattr(obj, k, v)
            klass: Any = user_cls
            if klass.__init__ is not object.__init__:
                klass.__init__(obj)
            for hook in self._owner._info.get("enter", ()):
                getattr(obj, hook)()
            self._local = obj
        return self._local


class _MethodFunction(Function):
    """One method of a bound class: the Function call machinery with the method's name as
    the first positional argument of every input."""

    def __init__(self, inst: _ClsInstance, name: str, is_generator: bool, is_async: bool) -> None:
        super().__init__(None, inst._owner._app, f"{inst._owner._tag}.{name}", None)
        self._inst = inst
        self._method_name = name
        self._arg_prefix = (name,)
        self._is_generator = is_generator
        self._is_async = is_async

    def __repr__(self) -> str:
        return f"Method({self._tag!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (getattr, (self._inst, self._method_name))

    def _hydrate(self) -> str:
        return self._inst._fn._hydrate()

    def _hydrate_metadata(self, info: dict[str, Any]) -> None:
        pass

    def _get_web_url(self) -> str | None:
        """The URL of this method's web endpoint (the class's default pool serves them), or None."""
        base = self._inst._owner._base
        if base._raw_f is not None and not any(ep.get("method_name") == self._method_name for ep in base._web):
            return None
        if not base._web_known:
            base._get_web_url()
        return base._web_urls.get(self._method_name)

    def local(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self._inst._local_instance(), self._method_name)(*args, **kwargs)

    def get_raw_f(self) -> Callable[..., Any]:
        """The method with ``self`` left out (its signature is the call's: ``flare run``'s flags)."""
        user_cls = self._inst._owner._user_cls
        if user_cls is None:
            return Function.get_raw_f(self)
        import functools

        return functools.partial(getattr(user_cls, self._method_name), None)

    def _remote_gen(self, *args: Any, **kwargs: Any) -> Iterator[Any]:
        if self._inst._owner._info.get("methods") is not None:
            return super()._remote_gen(*args, **kwargs)
        # Looked up by name: which methods are generators is not known here.
        from . import _invocation
        from ._serialization import b64, serialize_args

        payload = serialize_args(self._arg_prefix + args, kwargs)
        return _invocation.gen_iter(_invocation.client(), self._hydrate(), b64(payload), self._tag)

    def _catch_up_logs(self, resp: dict[str, Any]) -> None:
        from . import _output

        app = self._inst._owner._app
        if _output._streamers and app is not None:
            _output.catch_up(app._app_id, resp.get("log_seq"))


def __reduce_instance(self: _ClsInstance) -> tuple[Any, ...]:
    return (_restore_instance, (self._owner, self._params))


def _restore_instance(owner: Cls, params: dict[str, Any]) -> _ClsInstance:
    if owner._info.get("params") is None:
        return owner()
    return owner(**params)


_ClsInstance.__reduce__ = __reduce_instance  # type: ignore[method-assign,assignment]
