from trustmesh.errors import InvalidInput, NotFound, error_from_code


def test_error_round_trips_through_its_wire_code() -> None:
    err = InvalidInput("bad thing", field="spec.x")
    back = error_from_code(**err.to_dict())
    assert isinstance(back, InvalidInput)
    assert str(back) == "spec.x: bad thing"


def test_unknown_wire_code_becomes_internal_error() -> None:
    back = error_from_code("nope", "x")
    assert back.exit_code == 1 and not isinstance(back, NotFound)
