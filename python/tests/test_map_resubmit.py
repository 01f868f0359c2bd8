"""Index remapping of a .map whose inputs are re-submitted after a control-plane restart."""

from flare._map import _InputLedger


def test_ledger_maps_new_indexes_back_and_delivers_once() -> None:
    led = _InputLedger()
    led.add("c1", [(i, f"p{i}") for i in range(5)])
    assert led.resolve("c1", 1) == 1
    assert led.resolve("c1", 3) == 3
    assert led.resolve("c1", 3) is None  # a duplicate output
    # the server forgot c1: resubmit what is pending, in original order
    items = led.resubmission()
    assert items == [(0, "p0"), (2, "p2"), (4, "p4")]
    led.rebind("c2", items)
    # later inputs streamed into the new call follow the resubmitted ones
    led.add("c2", [(5, "p5"), (6, "p6")])
    assert [led.resolve("c2", i) for i in range(5)] == [0, 2, 4, 5, 6]
    assert led.resolve("c2", 0) is None
    # a late output of the old call for an input already delivered counts nothing
    assert led.resolve("c1", 0) is None
    assert led.resolve("c9", 0) is None and led.resolve("c2", 99) is None
    assert led.pending == {}


def test_ledger_late_output_of_old_call_wins_once() -> None:
    led = _InputLedger()
    led.add("c1", [(0, "a"), (1, "b")])
    items = led.resubmission()
    led.rebind("c2", items)
    assert led.resolve("c1", 1) == 1  # the old call delivered it after all
    assert led.resolve("c2", 1) is None  # its re-run is dropped
    assert led.resolve("c2", 0) == 0
