"""``flare.App``: groups functions, runs them ephemerally (``app.run()``) or deploys them.

Imported inside containers when the user's module runs ``flare.App(...)`` and the
decorators, so at module level only ``os``/``sys`` and what ``App()`` and
``@app.function()`` need (``function``, ``_options``, ``exception``). The client
machinery (server, transport, mounts, uploads, environment capture) and the siblings a
trivial module does not use (``image``: a function with ``image=`` has imported it
already; ``cls``: only for ``@app.cls()`` or a method marked ``@flare.enter``/...;
``_api``: only to publish) are imported where they are used (deliberately lazy, for the
containers' start; ``tests/test_structure.py`` checks it).
"""

from __future__ import annotations

import os
import sys

from . import exception
from ._options import FunctionOptions, check_experimental_options
from .function import Function

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable

    from ._blobs import BlobSet
    from ._options import Retries
    from ._transport import Client
    from .image import Image
    from .schedule import Schedule


class LocalEntrypoint:
    """A function run on the caller's machine by ``flare run`` (``@app.local_entrypoint()``)."""

    def __init__(self, raw_f: Callable[..., Any], app: App, name: str) -> None:
        self.raw_f = raw_f
        self.app = app
        self.name = name
        self.__name__ = getattr(raw_f, "__name__", name)
        self.__doc__ = getattr(raw_f, "__doc__", None)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.raw_f(*args, **kwargs)

    def __repr__(self) -> str:
        return f"LocalEntrypoint({self.name!r})"


def _caller_file(depth: int = 2) -> str | None:
    try:
        f = sys._getframe(depth).f_globals.get("__file__")
    except ValueError:
        return None
    return os.path.abspath(f) if isinstance(f, str) else None


class App:
    """A group of functions deployed and run together (mirrors ``modal.App``)."""

    def __init__(self, name: str | None = None, *, image: Image | None = None, description: str | None = None) -> None:
        self._name = name
        self._description = description
        self._image = _check_image(image)
        # Images given to @app.function(image=...), by function tag.
        self._function_images: dict[str, Image] = {}
        self._functions: dict[str, Function] = {}
        # Classes (@app.cls) by tag, and the registered definitions by tag (the classes'
        # parameter/options variants are derived from them, flare/cls.py).
        self._classes: dict[str, Any] = {}
        self._defs: dict[str, dict[str, Any]] = {}
        self._local_entrypoints: dict[str, LocalEntrypoint] = {}
        self._app_id: str | None = None
        self._entry_file = _caller_file()
        self._running = False
        self._runtime: _AppRuntime | None = None
        if os.environ.get("FLARE_IS_REMOTE") == "1" and os.environ.get("FLARE_APP_NAME") in (name, None):
            self._app_id = os.environ.get("FLARE_APP_ID")

    def __repr__(self) -> str:
        return f"App({self._name!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (_restore_app, (self._name, self._app_id))

    @property
    def name(self) -> str | None:
        return self._name

    @property
    def app_id(self) -> str | None:
        return self._app_id

    @property
    def image(self) -> Image | None:
        """The default image of the app's functions (``App(image=...)``)."""
        return self._image

    @property
    def registered_functions(self) -> dict[str, Function]:
        return dict(self._functions)

    @property
    def registered_entrypoints(self) -> dict[str, LocalEntrypoint]:
        return dict(self._local_entrypoints)

    # ------------------------------------------------------------------ decorators

    def function(
        self,
        _f: Callable[..., Any] | None = None,
        *,
        image: Image | None = None,
        cpu: float | tuple[float, float] | None = None,
        memory: int | None = None,
        gpu: Any = None,
        timeout: int = 300,
        retries: int | Retries | None = None,
        env: dict[str, str] | None = None,
        min_containers: int = 0,
        max_containers: int | None = None,
        buffer_containers: int = 0,
        scaledown_window: int = 60,
        serialized: bool = False,
        name: str | None = None,
        block_network: bool = False,
        enable_memory_snapshot: bool = False,
        experimental_options: dict[str, Any] | None = None,
        schedule: Schedule | None = None,
    ) -> Any:
        """Decorator turning a function into a ``flare.Function`` that runs in containers.

        ``schedule=flare.Period(...)`` or ``flare.Cron(...)`` also runs it on its own, with
        no arguments, while the app is deployed or running (docs/SCHEDULES.md)."""
        image = _check_image(image)
        if schedule is not None:
            from .schedule import Schedule

            if not isinstance(schedule, Schedule):
                raise exception.InvalidError(
                    f"schedule={schedule!r}: expected flare.Period(...) or flare.Cron(...)"
                )
        check_experimental_options(experimental_options)
        # cpu=x reserves x cores (placement) and may burst above it; cpu=(x, y) also caps it at y.
        options = FunctionOptions.from_decorator(
            cpu=cpu,
            memory=memory,
            gpu=gpu,
            timeout=timeout,
            retries=retries,
            env=env,
            min_containers=min_containers,
            max_containers=max_containers,
            buffer_containers=buffer_containers,
            scaledown_window=scaledown_window,
            block_network=block_network,
            enable_memory_snapshot=enable_memory_snapshot,
        )

        def decorator(f: Callable[..., Any]) -> Function:
            if isinstance(f, Function):
                raise exception.InvalidError("@app.function() is applied twice to the same function")
            if not callable(f):
                raise exception.InvalidError(f"@app.function() must decorate a function, not {type(f).__name__}")
            if isinstance(f, type):
                raise exception.InvalidError("@app.function() cannot decorate a class: use @app.cls()")
            if getattr(f, "__flare_lifecycle__", None):
                # Only flare.cls's markers set it, so flare.cls is imported already.
                from .cls import check_not_lifecycle

                check_not_lifecycle(f)
            if self._running:
                raise exception.InvalidError("functions must be defined before app.run() starts")
            tag = name or getattr(f, "__qualname__", None) or getattr(f, "__name__", None)
            if not tag:
                raise exception.InvalidError("cannot determine the function's name: pass name=...")
            if "<locals>" in tag and name is None:
                tag = f.__name__
            max_inputs, target_inputs = getattr(f, "__flare_concurrency__", (1, None))
            batch = getattr(f, "__flare_batched__", None)
            if batch is not None:
                max_inputs, target_inputs = _batched_concurrency(f, batch, is_method=False)
            fn_options = options.with_concurrency(max_inputs, target_inputs)
            # Functions nested in other functions cannot be imported by name in the
            # container: ship them pickled by value instead.
            auto_serialize = "<locals>" in (getattr(f, "__qualname__", "") or "")
            fn = Function(f, self, tag, fn_options, serialized=serialized or auto_serialize)
            fn._batched = batch is not None
            web = getattr(f, "__flare_web__", None)  # flare/web_endpoints.py's mark
            if isinstance(web, dict):
                if batch is not None:
                    raise exception.InvalidError(f"{tag} is @flare.batched(): it cannot also be a web endpoint")
                fn._web = [{**web, "method_name": None}]
            if schedule is not None:
                _check_schedulable(fn, f, tag)
                fn._schedule = schedule
            if tag in self._functions and self._functions[tag]._raw_f is not f:
                raise exception.InvalidError(f"App {self._name!r} already has a function named {tag!r}")
            self._functions[tag] = fn
            if image is not None:
                self._function_images[tag] = image
            else:
                self._function_images.pop(tag, None)
            return fn

        if _f is not None:
            return decorator(_f)
        return decorator

    def cls(
        self,
        _c: type | None = None,
        *,
        image: Image | None = None,
        cpu: float | tuple[float, float] | None = None,
        memory: int | None = None,
        gpu: Any = None,
        timeout: int = 300,
        retries: int | Retries | None = None,
        env: dict[str, str] | None = None,
        min_containers: int = 0,
        max_containers: int | None = None,
        buffer_containers: int = 0,
        scaledown_window: int = 60,
        serialized: bool = False,
        name: str | None = None,
        block_network: bool = False,
        enable_memory_snapshot: bool = False,
        experimental_options: dict[str, Any] | None = None,
    ) -> Any:
        """Decorator turning a class into a ``flare.Cls``: its ``@flare.method()``s run in
        containers that share the class's ``@flare.enter()`` state (``flare/cls.py``).
        Takes every option ``@app.function()`` takes."""
        from .cls import Cls, class_info

        check_experimental_options(experimental_options)

        decorator_kwargs: dict[str, Any] = {
            "cpu": cpu, "memory": memory, "gpu": gpu, "timeout": timeout, "retries": retries, "env": env,
            "min_containers": min_containers, "max_containers": max_containers,
            "buffer_containers": buffer_containers, "scaledown_window": scaledown_window,
            "block_network": block_network, "enable_memory_snapshot": enable_memory_snapshot,
        }
        register = self.function(
            image=image, serialized=serialized, name=name, experimental_options=experimental_options, **decorator_kwargs
        )

        def decorator(c: type) -> Cls:
            if isinstance(c, Cls):
                raise exception.InvalidError("@app.cls() is applied twice to the same class")
            info = class_info(c)
            if not info["methods"] and not info.get("web"):
                raise exception.InvalidError(
                    f"{c.__qualname__} has no @flare.method() and no web endpoint: nothing to call"
                )
            # The class's own concurrency (@flare.concurrent above or below @app.cls).
            base = _register_class(register, c)
            base._web = [dict(ep) for ep in info.get("web") or ()]
            batch = info.get("batched")
            if batch is not None and base._options is not None:
                # Up to max_batch_size inputs reach one container, so that a batch can fill.
                if getattr(c, "__flare_concurrency__", None) is not None:
                    raise exception.InvalidError(
                        f"{c.__qualname__} has a @flare.batched() method: it cannot also be @flare.concurrent()"
                    )
                n = batch["max_batch_size"]
                base._options = base._options.with_concurrency(n, n)
            try:
                c.__flare_cls_info__ = info  # type: ignore[attr-defined]
            except (AttributeError, TypeError):
                raise exception.InvalidError(f"@app.cls() cannot annotate {c.__qualname__}") from None
            obj = Cls(c, self, base._tag, base, info, decorator_kwargs=decorator_kwargs)
            self._classes[base._tag] = obj
            return obj

        if _c is not None:
            return decorator(_c)
        return decorator

    def local_entrypoint(self, _f: Callable[..., Any] | None = None, *, name: str | None = None) -> Any:
        """Decorator for the function ``flare run`` calls on the local machine."""

        def decorator(f: Callable[..., Any]) -> LocalEntrypoint:
            tag = name or f.__name__
            if tag in self._local_entrypoints:
                raise exception.InvalidError(f"App {self._name!r} already has a local entrypoint named {tag!r}")
            ep = LocalEntrypoint(f, self, tag)
            self._local_entrypoints[tag] = ep
            return ep

        if _f is not None:
            return decorator(_f)
        return decorator

    # ------------------------------------------------------------------ running

    def run(self, *, show_output: bool | None = None, detach: bool = False) -> _RunContext:
        """Context manager: start an ephemeral app with these functions; stop it on exit.

        With ``detach=True`` the app outlives this process (``flare run --detach``): on exit,
        or if this process dies, it keeps running until its queued and running calls are
        done, then stops (``flare app stop`` stops it sooner)."""
        return _RunContext(self, show_output, detach)

    @staticmethod
    def lookup(name: str, *, create_if_missing: bool = False) -> App:
        """The deployed app named ``name`` (``modal.App.lookup``); with ``create_if_missing``
        an empty deployed app of that name is made when there is none."""
        from . import _api, _invocation

        client = _invocation.client()
        try:
            info = client.request("GET", _api.app_by_name(name))
        except exception.NotFoundError:
            if not create_if_missing:
                raise exception.NotFoundError(
                    f"no deployed app named {name!r} (deploy it, or App.lookup({name!r}, create_if_missing=True))"
                ) from None
            info = client.request("POST", _api.apps(), {"name": name, "mode": "deployed"})
        return _restore_app(str(info["name"]), str(info["app_id"]))

    def deploy(self, name: str | None = None) -> App:
        """Deploy (or redeploy) this app under ``name``; its functions stay available by name."""
        from ._server import ensure_server

        deploy_name = name or self._name
        if not deploy_name:
            raise exception.InvalidError("a deployed app needs a name: flare.App('name') or deploy(name=...)")
        from ._output import output_enabled

        client = ensure_server()
        _publish(self, client, deploy_name, "deployed", output_enabled())
        return self

    def _image_for(self, tag: str) -> Image | None:
        return self._function_images.get(tag) or self._image

    def _default_name(self) -> str:
        if self._name:
            return self._name
        if self._entry_file:
            return os.path.splitext(os.path.basename(self._entry_file))[0]
        return "app"


def _register_class(register: Callable[[Any], Function], c: type) -> Function:
    """``@app.function`` for a class's base registration (it refuses classes elsewhere)."""

    def stand_in() -> None:  # pragma: no cover - replaced below
        pass

    stand_in.__qualname__ = c.__qualname__
    stand_in.__name__ = c.__name__
    stand_in.__module__ = c.__module__
    conc = getattr(c, "__flare_concurrency__", None)
    if conc is not None:
        stand_in.__flare_concurrency__ = conc  # type: ignore[attr-defined]
    fn = register(stand_in)
    fn._raw_f = c
    fn.__flare_raw_f__ = c
    fn._is_generator = fn._is_async = False
    fn._is_class = True  # type: ignore[attr-defined]
    return fn


def _batched_concurrency(f: Any, batch: dict[str, int], is_method: bool) -> tuple[int, int]:
    """A batched function's ``(max_inputs, target_inputs)``: ``max_batch_size`` each, so that
    the control plane hands one container enough inputs to fill a batch."""
    from .batching import positional_count

    name = getattr(f, "__qualname__", "the function")
    if getattr(f, "__flare_concurrency__", None) is not None:
        raise exception.InvalidError(f"{name} cannot be both @flare.batched() and @flare.concurrent()")
    if positional_count(f, is_method) < 1:
        raise exception.InvalidError(f"batched function {name} takes no arguments; it needs at least one (a list per argument)")
    n = batch["max_batch_size"]
    return n, n


def _check_image(image: Any) -> Image | None:
    if image is None:
        return None
    from .image import Image  # imported already when ``image`` is one

    if not isinstance(image, Image):
        raise exception.InvalidError(
            f"image= must be a flare.Image (e.g. flare.Image.debian_slim().pip_install(...)), not {type(image).__name__}"
        )
    return image


def _restore_app(name: str | None, app_id: str | None) -> App:
    app = App.__new__(App)
    app._name = name
    app._description = None
    app._image = None
    app._function_images = {}
    app._functions = {}
    app._classes = {}
    app._defs = {}
    app._local_entrypoints = {}
    app._app_id = app_id
    app._entry_file = None
    app._running = False
    app._runtime = None
    return app


def _entry_file(app: App) -> str | None:
    if app._entry_file and os.path.isfile(app._entry_file):
        return app._entry_file
    for fn in app._functions.values():
        mod = sys.modules.get(getattr(fn._raw_f, "__module__", "") or "")
        f = getattr(mod, "__file__", None)
        if isinstance(f, str) and os.path.isfile(f):
            return os.path.abspath(f)
    return None


def _function_def(
    fn: Function,
    entry_dir: str | None,
    mount_id: str | None,
    image_id: str | None = None,
    sdk_mount: str | None = None,
) -> dict[str, Any]:
    from ._localenv import python_info
    from ._mount import module_name_for
    from ._serialization import b64

    raw = fn.get_raw_f()
    module: str | None = None
    qualname: str | None = None
    pickled: str | None = None
    if fn._serialized:
        import cloudpickle

        try:
            pickled = b64(cloudpickle.dumps(raw, protocol=4))
        except Exception as e:  # noqa: BLE001
            raise exception.SerializationError(f"Could not serialize function {fn._tag!r}: {type(e).__name__}: {e}") from None
    else:
        mod_name = getattr(raw, "__module__", None) or ""
        mod = sys.modules.get(mod_name)
        file = getattr(mod, "__file__", None)
        if file and entry_dir and os.path.realpath(file).startswith(entry_dir + os.sep):
            module = module_name_for(file, entry_dir)
        elif mod_name and mod_name != "__main__":
            module = mod_name  # importable from the exposed sys.path entries
        else:
            raise exception.InvalidError(
                f"Function {fn._tag!r} is defined in a module that cannot be imported in the container; "
                "use @app.function(serialized=True)"
            )
        qualname = raw.__qualname__
    python = python_info(entry_dir)
    if sdk_mount:
        python["sdk_mount"] = sdk_mount
    fdef: dict[str, Any] = {
        "name": fn._tag,
        "module": module,
        "qualname": qualname,
        "serialized": fn._serialized,
        "pickled": pickled,
        "mount_id": mount_id,
        "is_generator": fn._is_generator,
        "is_async": fn._is_async,
        "python": python,
        "config": dict(fn._config),
    }
    if getattr(fn, "_is_class", False):
        fdef["is_class"] = True
    if fn._web:
        fdef["web"] = [dict(ep) for ep in fn._web]
    if fn._schedule is not None:
        fdef["schedule"] = fn._schedule._wire()
    if image_id is not None:
        fdef["image_id"] = image_id
    return fdef


def _check_schedulable(fn: Function, f: Callable[..., Any], tag: str) -> None:
    """A scheduled function runs with no arguments: it may have none that are required,
    and it is not a generator, a web endpoint or batched."""
    if fn._is_generator:
        raise exception.InvalidError(f"{tag} is a generator function: it cannot have a schedule")
    if fn._web:
        raise exception.InvalidError(f"{tag} is a web endpoint: it cannot have a schedule")
    if fn._batched:
        raise exception.InvalidError(f"{tag} is @flare.batched(): it cannot have a schedule")
    import inspect

    try:
        params = inspect.signature(f).parameters.values()
    except (TypeError, ValueError):
        return
    required = [
        p.name
        for p in params
        if p.default is inspect.Parameter.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    if required:
        raise exception.InvalidError(
            f"{tag} has a schedule, so it runs with no arguments, but it requires {', '.join(required)}: "
            "give them defaults or remove them"
        )


def _publish(
    app: App, client: Client, name: str, mode: str, show_output: bool = False, into_app_id: str | None = None
) -> str:
    """Build the functions' images, create the app on the server (``into_app_id``: register
    into that running app instead, as ``flare serve`` does on a reload: new versions of its
    functions), upload the code mount, register the functions."""
    from . import _api
    from ._blobs import BlobSet
    from ._mount import collect_files, sdk_entries

    # Images first: a failed build leaves no half-registered app behind.
    images = {tag: img for tag in app._functions if (img := app._image_for(tag)) is not None}
    image_ids: dict[int, str] = {}
    if images:
        from .image import build_images

        image_ids = build_images(client, list(images.values()), show_output)
    entry = _entry_file(app)
    entry_dir = os.path.dirname(os.path.realpath(entry)) if entry else None
    # Functions without an image run on a copy of this Python environment, captured into
    # the server's store (None: not captured; the worker binds the host's dirs instead).
    local_image_id: str | None = None
    if len(images) < len(app._functions):
        from ._localenv import capture

        local_image_id = capture(client, entry_dir, show_output)
    blobs = BlobSet()
    entries = collect_files(entry, blobs) if entry else None
    # The SDK and cloudpickle reach containers through the store too (one upload check
    # with the code mount's files), never as host paths for the server to bind.
    sdk_files = sdk_entries(blobs)
    if into_app_id is not None:
        app_id = into_app_id
    else:
        body: dict[str, Any] = {"name": name, "mode": mode}
        if app._description:
            body["description"] = app._description
        app_id = str(client.request("POST", _api.apps(), body)["app_id"])
    app._app_id = app_id
    mount_id, sdk_mount = _create_mounts(client, blobs, entries, sdk_files)
    defs = []
    for fn in app._functions.values():
        img = images.get(fn._tag)
        image_id = image_ids[id(img)] if img is not None else local_image_id
        defs.append(_function_def(fn, entry_dir, mount_id, image_id, sdk_mount))
    app._defs = {d["name"]: d for d in defs}
    if defs:
        registered = client.request("POST", _api.app_functions(app_id), {"functions": defs})["functions"]
        take_registration(app, registered)
    return app_id


def take_registration(app: App, registered: list[dict[str, Any]]) -> None:
    """The ids and web endpoint URLs of the registration answer, onto the app's functions."""
    by_name = {r["name"]: r for r in registered}
    for fn in app._functions.values():
        r = by_name.get(fn._tag)
        fn._function_id = r["function_id"] if r is not None else None
        fn._forget_web_urls()
        if r is not None:
            fn._take_web_urls(r)


def web_urls(app: App) -> list[tuple[str, str]]:
    """``(name, url)`` of every web endpoint of the registered app (a class's as
    ``Class.method``), in definition order."""
    out: list[tuple[str, str]] = []
    for fn in app._functions.values():
        if fn._web_url:
            out.append((fn._tag, fn._web_url))
        for method, url in fn._web_urls.items():
            out.append((f"{fn._tag}.{method}", url))
    return out


def _create_mounts(client: Client, blobs: BlobSet, *mounts: list[dict[str, Any]] | None) -> list[str | None]:
    """Upload the mounts' files (one check for all of them; only blobs the server lacks)
    and create each mount (None stays None)."""
    from . import _api

    inline = False
    try:
        blobs.upload(client)
    except exception.NotFoundError:
        inline = True  # a server from before content-addressed uploads: files inline
    out: list[str | None] = []
    for entries in mounts:
        if entries is None:
            out.append(None)
        elif inline:
            from ._serialization import b64

            files = []
            for e in entries:
                if e["kind"] == "file":
                    src = blobs.sources[e["digest"]]
                    if isinstance(src, str):
                        with open(src, "rb") as fh:
                            src = fh.read()
                    files.append({"path": e["path"], "data": b64(src), "mode": e["mode"]})
            out.append(str(client.request("POST", _api.mounts(), {"files": files})["mount_id"]))
        else:
            out.append(str(client.request("POST", _api.mounts(), {"entries": entries})["mount_id"]))
    return out


class _AppRuntime:
    """Heartbeats and log streaming of a running ephemeral app."""

    def __init__(self, client: Client, app_id: str, show_output: bool) -> None:
        import threading

        self.client = client
        self.app_id = app_id
        self.stop_event = threading.Event()
        self.heartbeat = threading.Thread(target=self._heartbeat_main, name="flare-heartbeat", daemon=True)
        self.heartbeat.start()
        self.logs = None
        if show_output:
            from ._output import LogStreamer

            self.logs = LogStreamer(client, app_id)
            self.logs.start()

    def _heartbeat_main(self) -> None:
        from . import _api

        try:
            while not self.stop_event.wait(10.0):
                try:
                    self.client.request("POST", _api.app_heartbeat(self.app_id), {}, timeout=10)
                except exception.Error:
                    pass  # transient; the server tolerates 60 s without one
        finally:
            self.client.close()

    def leave(self) -> None:
        """A detached app's client goes: no more heartbeats; the app carries on."""
        from . import _api

        self.stop_event.set()
        try:
            self.client.request("POST", _api.app_detach(self.app_id), {"client_left": True}, timeout=30)
        except exception.Error:
            pass  # the server also sees the heartbeats end
        finally:
            if self.logs is not None:
                self.logs.drain()

    def stop(self) -> None:
        from . import _api

        self.stop_event.set()
        try:
            self.client.request("POST", _api.app_stop(self.app_id), {}, timeout=120)
        finally:
            if self.logs is not None:
                self.logs.drain()


class _RunContext:
    def __init__(self, app: App, show_output: bool | None, detach: bool = False) -> None:
        self.app = app
        self.show_output = show_output
        self.detach = detach

    def __enter__(self) -> App:
        from . import _api
        from ._output import output_enabled
        from ._server import ensure_server

        app = self.app
        if app._running:
            raise exception.InvalidError(f"App {app._name!r} is already running")
        client = ensure_server()
        app._running = True
        try:
            show = output_enabled() if self.show_output is None else self.show_output
            app_id = _publish(app, client, app._default_name(), "ephemeral", show)
            if self.detach:
                client.request("POST", _api.app_detach(app_id), {})
            app._runtime = _AppRuntime(client, app_id, show)
        except BaseException:
            app._running = False
            if app._app_id is not None:
                try:
                    client.request("POST", _api.app_stop(app._app_id), {}, timeout=60)
                except Exception:  # noqa: BLE001
                    pass
                app._app_id = None
            raise
        return app

    def __exit__(self, *exc: Any) -> None:
        app = self.app
        runtime = app._runtime
        app._runtime = None
        app._running = False
        try:
            if runtime is not None:
                if self.detach:
                    runtime.leave()
                    print(
                        f"flare: app {app._default_name()} ({runtime.app_id}) is detached and keeps running "
                        f"until its calls are done; `flare app logs {runtime.app_id}` follows it, "
                        f"`flare app stop {runtime.app_id}` stops it",
                        file=sys.stderr,
                    )
                else:
                    runtime.stop()
        finally:
            app._app_id = None
            for fn in app._functions.values():
                fn._function_id = None
                fn._forget_web_urls()
            for c in app._classes.values():
                for bound in c._bound.values():
                    bound._function_id = None
                c._bound.clear()
            app._defs = {}
