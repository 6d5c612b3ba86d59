"""Messages of the package's exceptions."""
from __future__ import annotations

from flashmla_cupy.errors import CompileError, InvalidInputError, Violation

NVRTC_LOG = """\
decode.cu(12): warning #177-D: variable "unused" was declared but never referenced
decode.cu(40): error: identifier "tile_rows" is undefined
decode.cu(41): error: expected a ";"
2 errors detected in the compilation of "decode.cu".
"""


def test_compile_error_shows_variant_flags_and_first_error():
    error = CompileError("decode_bf16", ["-arch=sm_90a", "-std=c++17"], NVRTC_LOG)
    message = str(error)
    assert "'decode_bf16'" in message and "-arch=sm_90a -std=c++17" in message
    assert 'first error: decode.cu(40): error: identifier "tile_rows" is undefined' in message
    assert "warning" not in message and "errors detected" not in message
    assert error.log == NVRTC_LOG and error.flags == ["-arch=sm_90a", "-std=c++17"]
    assert isinstance(error, RuntimeError)


def test_compile_error_without_an_error_line():
    assert CompileError("combine_fp16", [], "\n  something odd\n").first_error == "something odd"
    assert CompileError("combine_fp16", [], "").first_error == "(empty compiler log)"


def test_input_error_lists_every_violation():
    error = InvalidInputError("f", [Violation("q.dtype", "float32", "bfloat16", "cast q"),
                                    Violation("causal", "'yes'", "a bool", "pass True or False")])
    assert isinstance(error, ValueError) and isinstance(error, TypeError)
    assert str(error).splitlines() == [
        "f: 2 invalid inputs:",
        "  - q.dtype: got float32, expected bfloat16. Fix: cast q",
        "  - causal: got 'yes', expected a bool. Fix: pass True or False"]
