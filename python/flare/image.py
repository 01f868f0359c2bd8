"""``flare.Image``: container images built by the server from a spec (mirrors ``modal.Image``).

An ``Image`` is an immutable recipe: every method returns a new one. Nothing is read or
built when it is defined (apart from checks that local paths exist); the spec is resolved
(local files hashed and uploaded) and built when an app using it is published. See
docs/IMAGES.md for the spec and the build protocol.

User modules define images at import time, so this module is also imported inside
containers: at module level only ``os``/``sys`` and sibling modules as light, and no
local-path checks there. What resolving and building need (``re``, ``pathlib``,
hashing, uploads, mounts, cloudpickle) is imported by the functions that do it
(deliberately lazy, for the containers' start; ``tests/test_structure.py`` checks it).
"""

from __future__ import annotations

import os
import sys

from . import _api, exception
from .function import Function

TYPE_CHECKING = False
if TYPE_CHECKING:
    from pathlib import Path, PurePosixPath
    from typing import Any, Callable, Iterable, Iterator, Sequence, Union

    from ._blobs import BlobSet
    from ._transport import Client

    IgnoreSpec = Union[Sequence[str], Callable[[Path], bool]]


_MOUNT_THEN_BUILD = (
    "An image tried to run a build step after using `image.add_local_*` to include local files.\n\n"
    "Run `image.add_local_*` commands last in your image build to avoid rebuilding images with every "
    "local file change. Flare will then add these files to containers on startup instead, saving build time.\n"
    "If you need to run other build steps after adding local files, set `copy=True` to copy the files "
    "directly into the image, at the expense of some added build time."
)

# Seconds to wait for the next build event before giving up on the server.
_BUILD_EVENT_TIMEOUT = 1800.0


def _is_remote() -> bool:
    return os.environ.get("FLARE_IS_REMOTE") == "1"


def _force_build_env() -> bool:
    return os.environ.get("FLARE_FORCE_BUILD", "").strip().lower() not in ("", "0", "false", "no")


# ------------------------------------------------------------------ ignore patterns


def _pattern_regex(pattern: str) -> Any:
    """A dockerignore-style pattern as a regex over ``/``-separated relative paths:
    ``*`` and ``?`` stay within one path component, ``**`` spans any number of them."""
    import re

    out = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "*":
            if pattern.startswith("**", i):
                i += 2
                if i < n and pattern[i] == "/":
                    out.append("(?:.*/)?")
                    i += 1
                else:
                    out.append(".*")
                continue
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            j = pattern.find("]", i + 2 if pattern.startswith("[!", i) or pattern.startswith("[^", i) else i + 1)
            if j < 0:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1 : j]
                if body[:1] in ("!", "^"):
                    body = "^" + body[1:]
                out.append("[" + body.replace("\\", "\\\\") + "]")
                i = j
        elif c == "\\" and i + 1 < n:
            i += 1
            out.append(re.escape(pattern[i]))
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("^" + "".join(out) + "$")


class FilePatternMatcher:
    """Matches relative paths against dockerignore-style patterns (mirrors
    ``modal.FilePatternMatcher``, with Docker's current rule for parents): a path matches when
    the last pattern matching it or one of its parent directories is not a ``!`` exclusion.
    ``~matcher`` inverts it."""

    def __init__(self, *patterns: str) -> None:
        self._patterns: list[tuple[bool, Any]] = []
        self._inverted = False
        self._raw = list(patterns)
        for raw in patterns:
            if not isinstance(raw, str):
                raise exception.InvalidError(f"ignore patterns must be strings, got {raw!r}")
            p = raw.strip()
            exclusion = p.startswith("!")
            if exclusion:
                p = p[1:].strip()
            import posixpath

            p = posixpath.normpath(p.replace(os.sep, "/")).lstrip("/") if p else ""
            if not p or p == ".":
                continue
            self._patterns.append((exclusion, _pattern_regex(p)))

    @classmethod
    def from_file(cls, file_path: str | os.PathLike[str]) -> FilePatternMatcher:
        """Patterns from a ``.dockerignore``-style file (one a line, ``#`` comments)."""
        with open(os.fspath(file_path), encoding="utf-8") as fh:
            lines = [ln.strip() for ln in fh]
        return cls(*[ln for ln in lines if ln and not ln.startswith("#")])

    def __invert__(self) -> FilePatternMatcher:
        inv = FilePatternMatcher.__new__(FilePatternMatcher)
        inv._patterns = self._patterns
        inv._raw = self._raw
        inv._inverted = not self._inverted
        return inv

    def __repr__(self) -> str:
        return ("~" if self._inverted else "") + f"FilePatternMatcher({', '.join(map(repr, self._raw))})"

    @property
    def has_exclusions(self) -> bool:
        return any(excl for excl, _ in self._patterns)

    def _matches(self, rel: str) -> bool:
        rel = rel.strip("/")
        if not rel or rel == ".":
            return False
        parts = rel.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts) - 1)]
        matched = False
        for exclusion, regex in self._patterns:
            if exclusion != matched:
                continue  # cannot change the outcome
            if regex.match(rel) is not None or any(regex.match(p) is not None for p in prefixes):
                matched = not exclusion
        return matched

    def __call__(self, path: Path | str) -> bool:
        rel = os.fspath(path).replace(os.sep, "/")
        return self._matches(rel) != self._inverted


def _non_python_files() -> FilePatternMatcher:
    return ~FilePatternMatcher("**/*.py")


def _ignore_fn(ignore: Any) -> Callable[[Path], bool] | None:
    if ignore is None:
        return None
    if callable(ignore):
        return ignore  # type: ignore[no-any-return]
    if isinstance(ignore, str):
        ignore = [ignore]
    try:
        patterns = list(ignore)
    except TypeError:
        raise exception.InvalidError(
            f"ignore must be a list of glob patterns or a callable taking a pathlib.Path, got {ignore!r}"
        ) from None
    return FilePatternMatcher(*patterns) if patterns else None


# ------------------------------------------------------------------ local files


class _LocalAdd:
    """Local files to put at ``remote_path``: one file, or a directory tree."""

    def __init__(self, kind: str, local_path: str, remote_path: str, ignore: Callable[[Path], bool] | None = None) -> None:
        self.kind = kind  # "file" | "dir"
        self.local_path = local_path
        self.remote_path = remote_path
        self.ignore = ignore

    def __repr__(self) -> str:
        return f"_LocalAdd({self.kind!r}, {self.local_path!r}, {self.remote_path!r})"

    def resolve(self, blobs: BlobSet) -> tuple[str, list[dict[str, Any]]]:
        """``(dest, file list)``, the files' contents added to ``blobs``."""
        import posixpath

        if self.kind == "file":
            try:
                st = os.stat(self.local_path)
                if not os.path.isfile(self.local_path):
                    raise exception.InvalidError(f"Local file {self.local_path} is not a regular file")
                entry = blobs.file_entry(posixpath.basename(self.remote_path), self.local_path, st.st_mode)
            except FileNotFoundError:
                raise exception.InvalidError(f"Local file {self.local_path} does not exist") from None
            except OSError as e:
                raise exception.InvalidError(f"Cannot read local file {self.local_path}: {e.strerror or e}") from None
            return posixpath.dirname(self.remote_path) or "/", [entry]
        if not os.path.isdir(self.local_path):
            raise exception.InvalidError(f"Local directory {self.local_path} does not exist")
        return self.remote_path, _walk_dir(self.local_path, self.ignore, blobs)


def _walk_dir(root: str, ignore: Callable[[Path], bool] | None, blobs: BlobSet) -> list[dict[str, Any]]:
    """The file list of the tree at ``root``. Symlinks are recorded with their target and
    never followed; sockets, fifos and devices are skipped."""
    import stat
    from pathlib import Path

    can_prune = isinstance(ignore, FilePatternMatcher) and not ignore._inverted and not ignore.has_exclusions
    out: list[dict[str, Any]] = []

    def skip(rel: str) -> bool:
        return ignore is not None and bool(ignore(Path(rel)))

    def walk(directory: str, prefix: str) -> bool:
        """Appends the entries below ``directory``; True when it has no children on disk."""
        try:
            with os.scandir(directory) as it:
                children = sorted(it, key=lambda e: e.name)
        except OSError as e:
            raise exception.InvalidError(f"Cannot list {directory}: {e.strerror or e}") from None
        for child in children:
            rel = prefix + child.name
            try:
                st = child.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # removed while walking
            if stat.S_ISLNK(st.st_mode):
                if not skip(rel):
                    out.append({"path": rel, "kind": "symlink", "target": os.readlink(child.path)})
            elif stat.S_ISDIR(st.st_mode):
                if can_prune and skip(rel):
                    continue
                at = len(out)
                out.append({"path": rel, "kind": "dir", "mode": st.st_mode & 0o7777})
                empty = walk(child.path, rel + "/")
                if len(out) == at + 1 and (not empty or skip(rel)):
                    out.pop()  # everything below was ignored, or the empty directory itself is
            elif stat.S_ISREG(st.st_mode):
                if not skip(rel):
                    out.append(blobs.file_entry(rel, child.path, st.st_mode))
        return not children

    walk(root, "")
    return out


def _absolute_remote(remote_path: Any, method: str) -> str:
    import posixpath

    remote = os.fspath(remote_path) if isinstance(remote_path, (str, os.PathLike)) else None
    if not isinstance(remote, str) or not remote.startswith("/"):
        raise exception.InvalidError(f"image.{method}() needs an absolute remote_path, got {remote_path!r}")
    trailing = remote.endswith("/")
    remote = posixpath.normpath(remote)
    if remote.startswith("//"):
        remote = "/" + remote.lstrip("/")
    return remote + "/" if trailing and remote != "/" else remote


def _local(local_path: Any) -> str:
    if not isinstance(local_path, (str, os.PathLike)):
        raise exception.InvalidError(f"local_path must be a str or a path, got {local_path!r}")
    return os.path.abspath(os.path.expanduser(os.fspath(local_path)))


# ------------------------------------------------------------------ argument helpers


def _flatten_str_args(method: str, arg: str, args: Sequence[Any]) -> list[str]:
    out: list[str] = []

    def add(x: Any) -> None:
        if isinstance(x, str):
            out.append(x)
        elif isinstance(x, (list, tuple)):
            for y in x:
                add(y)
        else:
            raise exception.InvalidError(f"{method}: {arg} must be strings or lists of strings, got {x!r}")

    for a in args:
        add(a)
    return out


def _pip_options(
    extra_options: str, index_url: str | None, extra_index_url: str | None, find_links: str | None, pre: bool
) -> dict[str, Any]:
    for label, value in (("index_url", index_url), ("extra_index_url", extra_index_url), ("find_links", find_links)):
        if value is not None and not isinstance(value, str):
            raise exception.InvalidError(f"{label} must be a str, got {value!r}")
    if not isinstance(extra_options, str):
        raise exception.InvalidError(f"extra_options must be a str, got {extra_options!r}")
    return {
        "extra_options": extra_options,
        "index_url": index_url,
        "extra_index_url": extra_index_url,
        "find_links": find_links,
        "pre": bool(pre),
    }


def _pickle_callable(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """Base64 cloudpickle of ``fn`` (bound to ``args``/``kwargs``) as a zero-argument callable.
    A function from a local module (not installed) is pickled by value: the build container
    cannot import the user's files."""
    import functools

    import cloudpickle

    from ._serialization import b64

    target: Callable[..., Any] = functools.partial(fn, *args, **kwargs) if args or kwargs else fn
    mod_name = getattr(fn, "__module__", None) or ""
    mod = sys.modules.get(mod_name)
    by_value = False
    if mod is not None and mod_name != "__main__" and _is_local_module(mod):
        try:
            cloudpickle.register_pickle_by_value(mod)
            by_value = True
        except ValueError:
            pass
    try:
        return b64(cloudpickle.dumps(target, protocol=4))
    except Exception as e:  # noqa: BLE001
        name = getattr(fn, "__qualname__", repr(fn))
        raise exception.SerializationError(f"Could not serialize {name} for run_function: {type(e).__name__}: {e}") from None
    finally:
        if by_value:
            cloudpickle.unregister_pickle_by_value(mod)


def _is_local_module(mod: Any) -> bool:
    from ._mount import _SDK_DIR, _excluded_roots, _under

    f = getattr(mod, "__file__", None)
    if not isinstance(f, str):
        return False
    real = os.path.realpath(f)
    parts = real.split(os.sep)
    if "site-packages" in parts or "dist-packages" in parts or _under(real, os.path.realpath(_SDK_DIR)):
        return False
    return not any(_under(real, root) for root in _excluded_roots())


# ------------------------------------------------------------------ Image


class Image:
    """A container image (mirrors ``modal.Image``); build one from ``Image.debian_slim()``,
    ``Image.from_registry()`` or ``Image.from_local_python()`` and the builder methods."""

    __slots__ = ("_base", "_layers", "_mounts", "_force_build")

    def __init__(
        self,
        base: dict[str, Any],
        layers: tuple[Any, ...] = (),
        mounts: tuple[_LocalAdd, ...] = (),
        force_build: bool = False,
    ) -> None:
        self._base = base
        self._layers = layers  # layer dicts; a copy layer is ("copy", _LocalAdd); run_function is ("run_function", fn, args, kwargs)
        self._mounts = mounts
        self._force_build = force_build

    def __setattr__(self, name: str, value: Any) -> None:
        if hasattr(self, "_force_build"):
            raise AttributeError("flare.Image is immutable: its methods return a new Image")
        object.__setattr__(self, name, value)

    def __reduce__(self) -> tuple[Any, ...]:
        return (Image, (self._base, self._layers, self._mounts, self._force_build))

    def __repr__(self) -> str:
        base = self._base
        kind = base["type"]
        what = {
            "debian_slim": f"debian_slim(python_version={base.get('python_version')!r})",
            "registry": f"from_registry({base.get('ref')!r})",
            "local_python": "from_local_python()",
        }.get(kind, kind)
        extra = f", {len(self._layers)} layers" if self._layers else ""
        extra += f", {len(self._mounts)} mounts" if self._mounts else ""
        return f"Image({what}{extra})"

    # ---------------------------------------------------------------- bases

    @staticmethod
    def debian_slim(python_version: str | None = None, force_build: bool = False) -> Image:
        """Debian slim with the given Python (default: this interpreter's major.minor)."""
        if python_version is None:
            python_version = f"{sys.version_info.major}.{sys.version_info.minor}"
        if not isinstance(python_version, str):
            raise exception.InvalidError(f"python_version must be a str like '3.11', got {python_version!r}")
        parts = python_version.split(".")
        if not (len(parts) in (2, 3) and parts[0] == "3" and all(p.isdigit() for p in parts)):
            raise exception.InvalidError(f"python_version must look like '3.11' or '3.11.9', got {python_version!r}")
        return Image({"type": "debian_slim", "python_version": python_version}, force_build=bool(force_build))

    @staticmethod
    def from_registry(tag: str, *, insecure: bool = False, force_build: bool = False) -> Image:
        """An image from an OCI/Docker registry (``insecure``: a plain-HTTP registry)."""
        if not isinstance(tag, str) or not tag.strip() or any(c.isspace() for c in tag.strip()):
            raise exception.InvalidError(f"from_registry() needs an image reference like 'python:3.11-slim', got {tag!r}")
        return Image({"type": "registry", "ref": tag.strip(), "insecure": bool(insecure)}, force_build=bool(force_build))

    @staticmethod
    def from_local_python() -> Image:
        """The caller's own Python environment (what functions without ``image=`` run on)."""
        return Image({"type": "local_python"})

    # ---------------------------------------------------------------- builder helpers

    def _extend(self, layer: Any, force_build: bool = False) -> Image:
        if self._mounts:
            raise exception.InvalidError(_MOUNT_THEN_BUILD)
        return Image(self._base, self._layers + (layer,), self._mounts, self._force_build or bool(force_build))

    def pip_install(
        self,
        *packages: str | list[str],
        find_links: str | None = None,
        index_url: str | None = None,
        extra_index_url: str | None = None,
        pre: bool = False,
        extra_options: str = "",
        force_build: bool = False,
    ) -> Image:
        """Install Python packages with pip (``image.pip_install("requests==2.32.3", ["numpy"])``)."""
        pkgs = _flatten_str_args("pip_install", "packages", packages)
        options = _pip_options(extra_options, index_url, extra_index_url, find_links, pre)
        if not pkgs:
            return self
        return self._extend({"type": "pip_install", "packages": sorted(pkgs), **options}, force_build)

    def pip_install_from_requirements(
        self,
        requirements_txt: str | os.PathLike[str],
        find_links: str | None = None,
        *,
        index_url: str | None = None,
        extra_index_url: str | None = None,
        pre: bool = False,
        extra_options: str = "",
        force_build: bool = False,
    ) -> Image:
        """Install the packages of a local requirements file (read now, on this machine)."""
        options = _pip_options(extra_options, index_url, extra_index_url, find_links, pre)
        path = _local(requirements_txt)
        text: str | None = None
        if not _is_remote():
            try:
                with open(path, encoding="utf-8") as fh:
                    text = fh.read()
            except FileNotFoundError:
                raise exception.InvalidError(f"Requirements file {path} does not exist") from None
            except (OSError, UnicodeDecodeError) as e:
                raise exception.InvalidError(f"Cannot read requirements file {path}: {e}") from None
        return self._extend({"type": "pip_install_from_requirements", "requirements": text, **options}, force_build)

    def apt_install(self, *packages: str | list[str], force_build: bool = False) -> Image:
        """Install Debian packages with apt-get."""
        pkgs = _flatten_str_args("apt_install", "packages", packages)
        if not pkgs:
            return self
        return self._extend({"type": "apt_install", "packages": pkgs}, force_build)

    def run_commands(self, *commands: str | list[str], force_build: bool = False) -> Image:
        """Run shell commands in the image (one layer for all of them)."""
        cmds = _flatten_str_args("run_commands", "commands", commands)
        if not cmds:
            return self
        return self._extend({"type": "run_commands", "commands": cmds}, force_build)

    def env(self, vars: dict[str, str]) -> Image:
        """Set environment variables in the image."""
        if not isinstance(vars, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in vars.items()):
            raise exception.InvalidError(f"env() needs a dict of str to str, got {vars!r}")
        if any(not k or "=" in k for k in vars):
            raise exception.InvalidError(f"invalid environment variable name in {sorted(vars)!r}")
        return self._extend({"type": "env", "vars": dict(vars)})

    def workdir(self, path: str | os.PathLike[str]) -> Image:
        """Set the working directory for later build steps and for functions."""
        if not isinstance(path, (str, os.PathLike)) or not os.fspath(path):
            raise exception.InvalidError(f"workdir() needs a path, got {path!r}")
        return self._extend({"type": "workdir", "path": os.fspath(path).replace(os.sep, "/")})

    def run_function(
        self,
        raw_f: Callable[..., Any],
        *,
        force_build: bool = False,
        args: Sequence[Any] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Image:
        """Run a Python function (pickled with cloudpickle) in the image as a build step."""
        if isinstance(raw_f, Function):
            raw_f = raw_f.get_raw_f()
        if not callable(raw_f):
            raise exception.InvalidError(f"run_function() needs a callable, got {raw_f!r}")
        return self._extend(("run_function", raw_f, tuple(args), dict(kwargs or {})), force_build)

    # ---------------------------------------------------------------- local files

    def _add_local(self, add: _LocalAdd, copy: bool) -> Image:
        if copy:
            return self._extend(("copy", add))
        return Image(self._base, self._layers, self._mounts + (add,), self._force_build)

    def add_local_file(
        self, local_path: str | os.PathLike[str], remote_path: str | PurePosixPath, *, copy: bool = False
    ) -> Image:
        """Put a local file at ``remote_path`` (ending in ``/``: in that directory). Added when
        containers start, or (``copy=True``) copied into the image as a layer."""
        local = _local(local_path)
        remote = _absolute_remote(remote_path, "add_local_file")
        if remote.endswith("/"):
            remote += os.path.basename(local)
        if not _is_remote():
            if not os.path.exists(local):
                raise exception.InvalidError(f"add_local_file(): local file {local} does not exist")
            if not os.path.isfile(local):
                raise exception.InvalidError(f"add_local_file(): {local} is not a file")
        return self._add_local(_LocalAdd("file", local, remote), copy)

    def add_local_dir(
        self,
        local_path: str | os.PathLike[str],
        remote_path: str | PurePosixPath,
        *,
        copy: bool = False,
        ignore: IgnoreSpec = (),
    ) -> Image:
        """Put a local directory tree at ``remote_path``. ``ignore``: dockerignore-style glob
        patterns, or a callable given each path relative to the directory (a ``pathlib.Path``)
        that returns True to leave it out. Symlinks are kept as symlinks, never followed."""
        local = _local(local_path)
        remote = _absolute_remote(remote_path, "add_local_dir").rstrip("/") or "/"
        ignore_fn = _ignore_fn(ignore)
        if not _is_remote():
            if not os.path.exists(local):
                raise exception.InvalidError(f"add_local_dir(): local directory {local} does not exist")
            if not os.path.isdir(local):
                raise exception.InvalidError(f"add_local_dir(): {local} is not a directory")
        return self._add_local(_LocalAdd("dir", local, remote, ignore_fn), copy)

    def add_local_python_source(
        self, *module_names: str, copy: bool = False, ignore: IgnoreSpec | None = None
    ) -> Image:
        """Ship local Python modules/packages (found like ``import`` would) to ``/root/<name>``.
        By default only their ``.py`` files are sent."""
        ignore_fn = _ignore_fn(ignore) if ignore is not None else _non_python_files()
        img = self
        for name in module_names:
            if not isinstance(name, str) or not name or any(not p.isidentifier() for p in name.split(".")):
                raise exception.InvalidError(f"add_local_python_source() needs module names, got {name!r}")
            remote_base = "/root/" + name.replace(".", "/")
            if _is_remote():
                img = img._add_local(_LocalAdd("dir", "", remote_base, ignore_fn), copy)
                continue
            for add in _python_source(name, remote_base, ignore_fn):
                img = img._add_local(add, copy)
        return img

    # ---------------------------------------------------------------- misc

    def imports(self) -> _Imports:
        """Context manager for imports that only the image has: on this machine an
        ``ImportError`` inside it is swallowed; in a container it is raised."""
        return _Imports()

    # ---------------------------------------------------------------- resolution

    def _resolve(self, blobs: BlobSet) -> dict[str, Any]:
        """The JSON spec of docs/IMAGES.md; local files' contents are added to ``blobs``."""
        layers: list[dict[str, Any]] = []
        for layer in self._layers:
            if isinstance(layer, dict):
                layers.append(dict(layer))
            elif layer[0] == "copy":
                dest, entries = layer[1].resolve(blobs)
                layers.append({"type": "copy", "dest": dest, "entries": entries})
            elif layer[0] == "run_function":
                _, fn, args, kwargs = layer
                name = getattr(fn, "__name__", None) or type(fn).__name__
                layers.append({"type": "run_function", "name": name, "pickled": _pickle_callable(fn, args, kwargs)})
        mounts = []
        for add in self._mounts:
            dest, entries = add.resolve(blobs)
            mounts.append({"dest": dest, "entries": entries})
        return {
            "base": dict(self._base),
            "layers": layers,
            "mounts": mounts,
            "force_build": self._force_build or _force_build_env(),
        }


class _Imports:
    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        return exc_type is not None and issubclass(exc_type, ImportError) and not _is_remote()


def _python_source(name: str, remote_base: str, ignore: Callable[[Path], bool] | None) -> Iterator[_LocalAdd]:
    import importlib.util

    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError) as e:
        raise exception.InvalidError(f"add_local_python_source(): cannot find module {name!r}: {e}") from None
    if spec is None:
        raise exception.InvalidError(f"add_local_python_source(): no module named {name!r} is importable here")
    locations = list(spec.submodule_search_locations or [])
    if locations:
        for loc in locations:
            if os.path.isdir(loc):
                yield _LocalAdd("dir", os.path.abspath(loc), remote_base, ignore)
        return
    origin = spec.origin
    if not origin or not origin.endswith(".py") or not os.path.isfile(origin):
        raise exception.InvalidError(
            f"add_local_python_source(): module {name!r} is not a Python source file (origin: {origin})"
        )
    yield _LocalAdd("file", os.path.abspath(origin), remote_base + ".py")


# ------------------------------------------------------------------ building


def _write(text: str) -> None:
    sys.stderr.write(text)
    sys.stderr.flush()


def build(client: Client, spec: dict[str, Any], show_output: bool) -> dict[str, Any]:
    """POST the (resolved, uploaded) spec to the image build route (``_api.images_build``) and follow the build;
    returns the ``done`` event. A failed build raises ``flare.exception.RemoteError``."""
    return follow_build(client.stream_ndjson("POST", _api.images_build(), spec, timeout=_BUILD_EVENT_TIMEOUT), show_output)


def follow_build(events: Iterable[Any], show_output: bool) -> dict[str, Any]:
    """Follow a build's event stream (printing progress when ``show_output``); returns the
    ``done`` event. A failed build raises ``flare.exception.RemoteError``."""
    steps: dict[int, tuple[int, str]] = {}
    at_line_start = True
    for raw in events:
        if not isinstance(raw, dict):
            continue
        ev: dict[str, Any] = raw
        kind = ev.get("type")
        if kind == "step":
            index = int(ev.get("index", 0))
            total = int(ev.get("total", 0))
            steps[index] = (total, str(ev.get("description", "")))
            if show_output:
                line = f"=> [{index + 1}/{total}] {ev.get('description', '')}" + (" (cached)" if ev.get("cached") else "")
                _write(("" if at_line_start else "\n") + line + "\n")
                at_line_start = True
        elif kind == "log":
            text = str(ev.get("text", ""))
            if show_output and text:
                _write(text)
                at_line_start = text.endswith("\n")
        elif kind == "step_done":
            if show_output:
                index = int(ev.get("index", 0))
                total = steps.get(index, (0, ""))[0]
                _write(("" if at_line_start else "\n") + f"=> [{index + 1}/{total}] done in {float(ev.get('seconds', 0)):.1f}s\n")
                at_line_start = True
        elif kind == "done":
            if show_output:
                _write(("" if at_line_start else "\n") + f"=> image {ev.get('image_id')} ready\n")
            return ev
        elif kind == "error":
            at = ev.get("index")
            message = str(ev.get("message") or "image build failed")
            where = ""
            if isinstance(at, int) and at in steps:
                total, description = steps[at]
                if description and description not in message:
                    where = f" (step {at + 1}/{total}: {description})"
            tail = str(ev.get("log_tail") or "").rstrip("\n")
            text = f"Image build failed: {message}{where}"
            if tail:
                text += "\n--- last output of the step ---\n" + tail
            raise exception.ImageBuildError(text)
    raise exception.RemoteError("The image build stream ended without a result")


def describe_base(base: dict[str, Any]) -> str:
    kind = base.get("type")
    if kind == "debian_slim":
        return f"debian_slim python {base.get('python_version')}"
    if kind == "registry":
        return f"registry image {base.get('ref')}"
    return str(kind)


def build_images(client: Client, images: list[Image], show_output: bool) -> dict[int, str]:
    """Build each distinct image (uploading its files first); ``id(image)`` -> image id."""
    import json

    from ._blobs import BlobSet

    blobs = BlobSet()
    specs: dict[str, dict[str, Any]] = {}
    key_of: dict[int, str] = {}
    for img in images:
        if id(img) in key_of:
            continue
        spec = img._resolve(blobs)
        key = json.dumps(spec, sort_keys=True, separators=(",", ":"))
        specs.setdefault(key, spec)
        key_of[id(img)] = key
    # run_function steps import cloudpickle from the SDK mount (sent through the store as
    # for functions); the server never binds a path of this machine into a build step.
    runs_functions = [s for s in specs.values() if any(la.get("type") == "run_function" for la in s["layers"])]
    sdk_files = None
    if runs_functions:
        from ._mount import sdk_entries

        sdk_files = sdk_entries(blobs)
    blobs.upload(client)
    if sdk_files is not None:
        sdk_mount = str(client.request("POST", _api.mounts(), {"entries": sdk_files})["mount_id"])
        for s in runs_functions:
            s["sdk_mount"] = sdk_mount
    built: dict[str, str] = {}
    for key, spec in specs.items():
        done = build(client, spec, show_output)
        image_id = done.get("image_id")
        if not isinstance(image_id, str) or not image_id:
            raise exception.RemoteError(f"The image build finished without an image id: {done!r}")
        if not done.get("python"):
            raise exception.InvalidError(
                f"Image {image_id} ({describe_base(spec['base'])}) has no Python interpreter, so functions cannot "
                "run on it. Use an image that has python3 on its PATH (e.g. Image.debian_slim() or "
                "Image.from_registry('python:3.11-slim')), or install one in it (.apt_install('python3'))."
            )
        built[key] = image_id
    return {ident: built[key] for ident, key in key_of.items()}
