"""The launch attributes handed to cuLaunchKernelEx, byte for byte (CUlaunchAttribute: a 4-byte id, 4
bytes of padding, a 64-byte value). No GPU."""
import ctypes
import struct

from flashmla_cupy import launch


def test_an_attribute_is_72_bytes_with_its_value_at_8():
    assert ctypes.sizeof(launch._LaunchAttribute) == 72
    assert launch._LaunchAttribute.value.offset == 8


def test_no_attributes_is_none():
    assert launch.launch_attributes() is None


def test_programmatic_dependent_launch_is_id_6_value_1():
    (attr,) = launch.launch_attributes(pdl=True)
    raw = bytes(attr)
    assert struct.unpack_from("<i", raw, 0)[0] == 6
    assert struct.unpack_from("<i", raw, 8)[0] == 1
    assert raw[12:] == bytes(60)


def test_a_cluster_shape_keeps_every_dimension():
    # a bytes value assigned to a c_char array stopped at its first zero byte: (4, 1, 1) became (4, 0, 0)
    pdl, cluster = launch.launch_attributes(pdl=True, cluster=(4, 1, 1))
    raw = bytes(cluster)
    assert struct.unpack_from("<i", raw, 0)[0] == 4
    assert struct.unpack_from("<3I", raw, 8) == (4, 1, 1)
    assert raw[20:] == bytes(52)
    assert bytes(pdl)[:4] == struct.pack("<i", 6)
