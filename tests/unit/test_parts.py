"""What a launch's parts decide before any request: the backends the launch may use."""

from kiln.engine.parts import Part, unsupported_backends


class RowsOnly(Part):
    name = "rows-only"
    backends = frozenset({"eager", "compile"})


def test_a_part_that_runs_on_some_backends_rules_out_the_others_with_a_reason() -> None:
    refused = unsupported_backends([Part(None, None), RowsOnly(None, None)])
    assert set(refused) == {"onnx", "openvino", "tensorrt"}
    assert refused["onnx"] == "rows-only runs on compile and eager only"
    assert unsupported_backends([Part(None, None)]) == {}
