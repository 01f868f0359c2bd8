"""flare.Cls on the client side: definition checks, instantiation, method payloads, pickling."""

from __future__ import annotations

import pickle

import pytest

import flare
from flare import exception
from flare.cls import Cls, bind_params, class_info


def _app() -> flare.App:
    return flare.App("cls-test")


def test_class_info_and_hook_order() -> None:
    app = _app()

    @app.cls(cpu=1, memory=512, scaledown_window=60)
    class Model:
        size: int = flare.parameter(default=3)
        name: str = flare.parameter(default="m")

        @flare.enter()
        def b(self) -> None: ...

        @flare.enter(snap=True)
        def a(self) -> None: ...

        @flare.method()
        def predict(self, x: int) -> int:
            return x

        @flare.method()
        def stream(self, n: int):  # type: ignore[no-untyped-def]
            yield from range(n)

        @flare.method()
        async def apredict(self, x: int) -> int:
            return x

        @flare.exit()
        def close(self) -> None: ...

    assert isinstance(Model, Cls)
    info = Model.__flare_raw_f__.__flare_cls_info__
    assert info["enter"] == ["a", "b"]  # snap=True first
    assert info["exit"] == ["close"]
    assert info["methods"]["stream"]["is_generator"] and not info["methods"]["predict"]["is_generator"]
    assert info["methods"]["apredict"]["is_async"]
    assert info["params"] == {"size": {"type": "int", "default": 3}, "name": {"type": "str", "default": "m"}}
    assert "Model" in app.registered_functions
    assert app.registered_functions["Model"]._config["cpu"] == 1


@pytest.mark.parametrize("ann", ["float", "list", "dict"])
def test_parameter_types_are_checked(ann: str) -> None:
    ns: dict[str, object] = {"flare": flare}
    exec(f"class C:\n    p: {ann} = flare.parameter()\n    @flare.method()\n    def m(self): pass\n", ns)
    with pytest.raises(exception.InvalidError, match="str, int, bool, bytes"):
        class_info(ns["C"])  # type: ignore[arg-type]


def test_parameter_default_type_is_checked() -> None:
    class C:
        p: int = flare.parameter(default="3")

    with pytest.raises(exception.InvalidError, match="int parameter"):
        class_info(C)


def test_bad_instantiation_args() -> None:
    spec = {"size": {"type": "int", "default": 3}, "tag": {"type": "str"}}
    with pytest.raises(exception.InvalidError, match="keyword arguments only"):
        bind_params("M", spec, (1,), {})
    with pytest.raises(exception.InvalidError, match="unknown parameter"):
        bind_params("M", spec, (), {"tag": "x", "nope": 1})
    with pytest.raises(exception.InvalidError, match="missing the parameter 'tag'"):
        bind_params("M", spec, (), {})
    with pytest.raises(exception.InvalidError, match="int parameter"):
        bind_params("M", spec, (), {"tag": "x", "size": True})
    assert bind_params("M", spec, (), {"tag": "x"}) == {"size": 3, "tag": "x"}


def test_lifecycle_on_function_is_an_error() -> None:
    app = _app()
    with pytest.raises(exception.InvalidError, match=r"@app.cls\(\)"):

        @app.function()
        @flare.enter()
        def f() -> None: ...

    with pytest.raises(exception.InvalidError, match=r"@app\.cls"):

        @app.function()
        class C: ...

    for deco in (flare.enter(), flare.exit(), flare.method()):
        with pytest.raises(exception.InvalidError, match=r"not a function made by @app\.function\(\).*@app\.cls\(\)"):

            @deco
            @_app().function(name="g")
            def g() -> None: ...


def test_method_outside_cls_is_an_error_when_registered() -> None:
    app = _app()
    with pytest.raises(exception.InvalidError, match=r"@app.cls\(\)"):

        @app.function()
        @flare.method()
        def f() -> None: ...

    with pytest.raises(exception.InvalidError, match=r"no @flare\.method"):

        @app.cls()
        class Empty:
            def plain(self) -> None: ...


def test_instances_methods_and_local() -> None:
    app = _app()

    @app.cls()
    class M:
        size: int = flare.parameter(default=2)

        @flare.enter()
        def load(self) -> None:
            self.w = [1] * self.size

        @flare.method()
        def predict(self, x: int) -> int:
            return sum(self.w) * x

    with pytest.raises(exception.InvalidError, match="keyword"):
        M(3)
    with pytest.raises(exception.InvalidError, match="unknown parameter"):
        M(bogus=1)
    assert M().predict.local(5) == 10
    assert M(size=4).predict.local(5) == 20
    with pytest.raises(AttributeError, match="its methods: predict"):
        M().nope  # noqa: B018
    # One pool per parameter set: the defaults use the class's own function.
    assert M()._fn is M._base and M(size=2)._fn is M._base
    assert M(size=5)._fn is M(size=5)._fn and M(size=5)._fn is not M(size=6)._fn
    assert M.with_options(cpu=2)()._fn is not M._base
    assert M.with_options(cpu=2)()._fn is M.with_options(cpu=2)()._fn  # registered once
    with pytest.raises(exception.InvalidError, match="unknown option"):
        M.with_options(nope=1)
    assert M(size=5).predict._arg_prefix == ("predict",)
    assert list(M().predict._map_items(([1, 2],))) == [("predict", 1), ("predict", 2)]
    assert list(M().predict._starmap_items([(1, 2)])) == [("predict", 1, 2)]


def test_pickling_by_reference() -> None:
    app = _app()

    @app.cls()
    class P:
        size: int = flare.parameter(default=2)

        @flare.method()
        def go(self) -> int:
            return self.size

    inst = pickle.loads(pickle.dumps(P(size=7)))
    assert inst._params == {"size": 7}
    m = pickle.loads(pickle.dumps(P(size=7).go))
    assert m._method_name == "go" and m._inst._params == {"size": 7}
    assert m._tag == "P.go"
    # A with_options variant stays that variant (its own pool) when pickled.
    v = pickle.loads(pickle.dumps(P.with_options(cpu=2)(size=7)))
    assert v._owner._options_override == {"cpu": 2}
    assert v._fn._tag == P.with_options(cpu=2)(size=7)._fn._tag != P(size=7)._fn._tag


def test_concurrent_on_a_class() -> None:
    app = _app()

    @app.cls()
    @flare.concurrent(max_inputs=4)
    class Below:
        @flare.method()
        def m(self) -> None: ...

    @flare.concurrent(max_inputs=5)
    @app.cls()
    class Above:
        @flare.method()
        def m(self) -> None: ...

    assert app.registered_functions["Below"]._config["max_inputs"] == 4
    assert app.registered_functions["Above"]._config["max_inputs"] == 5
