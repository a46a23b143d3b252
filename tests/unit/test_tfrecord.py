"""TFRecord framing, CRC-32C and the tf.train protobuf messages, without TensorFlow."""

import struct

import numpy as np
import pytest

from video_ens.data import tfrecord as tfr

# ---------------------------------------------------------------------------------------------------------------
# CRC-32C
# ---------------------------------------------------------------------------------------------------------------


def _crc_bitwise(data: bytes, value: int = 0) -> int:
    """Textbook bit-at-a-time CRC-32C: the reference the table-driven code must match."""
    crc = value ^ 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


@pytest.mark.parametrize(
    "data, expected",
    [
        (b"123456789", 0xE3069283),  # the standard check value of CRC-32C
        (bytes(32), 0x8A9136AA),  # RFC 3720 B.4: 32 bytes of zeros
        (b"\xff" * 32, 0x62A8AB43),  # RFC 3720 B.4: 32 bytes of ones
        (bytes(range(32)), 0x46DD794E),  # RFC 3720 B.4: incrementing
        (bytes(range(31, -1, -1)), 0x113FDB5C),  # RFC 3720 B.4: decrementing
        (b"", 0x00000000),
    ],
)
def test_crc32c_known_answers(data, expected):
    assert tfr.crc32c(data) == expected


def test_masked_crc_of_the_check_value():
    # rotr15(0xE3069283) = 0x2507C60D; + 0xA282EAD8 = 0xC78AB0E5 (mod 2**32)
    assert tfr.mask_crc(0xE3069283) == 0xC78AB0E5
    assert tfr.masked_crc32c(b"123456789") == 0xC78AB0E5
    assert tfr.unmask_crc(0xC78AB0E5) == 0xE3069283
    for v in (0, 1, 0xFFFFFFFF, 0x80000000, 0x12345678):
        assert tfr.unmask_crc(tfr.mask_crc(v)) == v


def test_vectorised_crc_matches_bitwise_reference_at_every_boundary():
    rng = np.random.default_rng(0)
    block = tfr._BLOCK
    lengths = [1, 3, 4, 5, 63, 64, 65, 100, block - 1, block, block + 1, 2 * block + 7, tfr._ROWS * block + 3]
    for n in lengths:
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert tfr.crc32c(data) == _crc_bitwise(data), n
        # Extend semantics: the CRC of a + b continues from the CRC of a.
        cut = n // 3
        assert tfr.crc32c(data[cut:], tfr.crc32c(data[:cut])) == _crc_bitwise(data), n


def test_crc_accepts_memoryview_and_bytearray():
    data = bytes(range(256)) * 3
    assert tfr.crc32c(memoryview(data)) == tfr.crc32c(bytearray(data)) == _crc_bitwise(data)


# ---------------------------------------------------------------------------------------------------------------
# Record framing
# ---------------------------------------------------------------------------------------------------------------


def _write(path, payloads):
    with tfr.TFRecordWriter(path) as w:
        for p in payloads:
            w.write(p)


def _offsets(payloads):
    out, pos = [], 0
    for p in payloads:
        out.append(pos)
        pos += 16 + len(p)
    return out


PAYLOADS = [b"", b"a", b"hello world" * 10, bytes(range(256)) * 40]


def test_writer_layout_matches_the_format(tmp_path):
    path = tmp_path / "one.tfrecord"
    _write(path, [b"abc"])
    raw = path.read_bytes()
    length = struct.pack("<Q", 3)
    assert raw[:8] == length
    assert struct.unpack("<I", raw[8:12])[0] == tfr.masked_crc32c(length)
    assert raw[12:15] == b"abc"
    assert struct.unpack("<I", raw[15:19])[0] == tfr.masked_crc32c(b"abc")
    assert len(raw) == 19


def test_round_trip(tmp_path):
    path = tmp_path / "r.tfrecord"
    _write(path, PAYLOADS)
    assert list(tfr.iter_records(path)) == PAYLOADS
    assert list(tfr.iter_records(path, verify=False)) == PAYLOADS


def test_flipped_payload_byte_skips_that_record_only(tmp_path):
    path = tmp_path / "r.tfrecord"
    _write(path, PAYLOADS)
    raw = bytearray(path.read_bytes())
    bad = 2
    raw[_offsets(PAYLOADS)[bad] + 12 + 5] ^= 0x01
    path.write_bytes(bytes(raw))

    errors = []
    got = list(tfr.iter_records(path, errors=errors))
    assert got == PAYLOADS[:bad] + PAYLOADS[bad + 1 :]
    assert len(errors) == 1
    err = errors[0]
    assert err.offset == _offsets(PAYLOADS)[bad] and not err.file_stopped
    assert err.record == bad  # its position in the file, the same numbering as the good records around it
    assert str(path) in str(err) and f"offset {err.offset}" in str(err) and "payload CRC" in str(err)
    assert f"record {bad} at" in str(err) and "this record is skipped" in str(err)

    with pytest.raises(tfr.TFRecordError, match="payload CRC mismatch"):
        list(tfr.iter_records(path))
    # Without verification the damaged payload comes through unnoticed.
    assert len(list(tfr.iter_records(path, verify=False))) == len(PAYLOADS)


def test_damaged_length_stops_the_file_with_its_offset(tmp_path):
    path = tmp_path / "r.tfrecord"
    _write(path, PAYLOADS)
    raw = bytearray(path.read_bytes())
    raw[_offsets(PAYLOADS)[1] + 2] ^= 0x40  # inside the length of record 1
    path.write_bytes(bytes(raw))
    errors = []
    assert list(tfr.iter_records(path, errors=errors)) == PAYLOADS[:1]
    assert len(errors) == 1 and errors[0].file_stopped and errors[0].offset == _offsets(PAYLOADS)[1]
    assert errors[0].record == 1
    # The records after it are lost with it: the error says so, and how much of the file went unread.
    remaining = len(raw) - _offsets(PAYLOADS)[1]
    assert errors[0].remaining == remaining
    message = str(errors[0])
    assert "length CRC" in message and f"the rest of this file, {remaining} bytes, cannot be read" in message


def test_truncated_file_is_reported(tmp_path):
    path = tmp_path / "r.tfrecord"
    _write(path, PAYLOADS)
    raw = path.read_bytes()
    path.write_bytes(raw[:-7])
    errors = []
    assert list(tfr.iter_records(path, errors=errors)) == PAYLOADS[:-1]
    assert errors[0].file_stopped and "truncated record" in str(errors[0])
    assert errors[0].record == len(PAYLOADS) - 1 and errors[0].remaining == len(raw) - 7 - _offsets(PAYLOADS)[-1]
    path.write_bytes(raw[: _offsets(PAYLOADS)[-1] + 5])
    with pytest.raises(tfr.TFRecordError, match="truncated header"):
        list(tfr.iter_records(path))


# ---------------------------------------------------------------------------------------------------------------
# Protobuf
# ---------------------------------------------------------------------------------------------------------------

CONTEXT = {
    "id": tfr.bytes_feature([b"Xy3a"]),
    "labels": tfr.int64_feature([0, 5, 3861, -1, 2**62, -(2**63)]),
    "score": tfr.float_feature([0.5, -2.25]),
    "empty": tfr.int64_feature([]),
}
LISTS = {
    "rgb": [tfr.bytes_feature([bytes([t]) * 1024]) for t in range(3)],
    "audio": [tfr.bytes_feature([bytes([t + 7]) * 128]) for t in range(3)],
    "none": [],
}


def test_sequence_example_round_trip():
    ex = tfr.decode_sequence_example(tfr.encode_sequence_example(CONTEXT, LISTS))
    assert ex.context == CONTEXT
    assert ex.feature_lists == LISTS


def test_example_round_trip():
    assert tfr.decode_example(tfr.encode_example(CONTEXT)) == CONTEXT


def test_decoder_reads_unpacked_scalars_and_skips_unknown_fields():
    def tag(number, wire):
        return bytes([(number << 3) | wire])

    def ld(number, payload):
        return tag(number, 2) + bytes([len(payload)]) + payload

    int64_list = tag(1, 0) + b"\x07" + tag(1, 0) + b"\x96\x01"  # unpacked 7, 150
    float_list = tag(1, 5) + struct.pack("<f", 1.5)  # unpacked 1.5
    unknown = tag(9, 0) + b"\x01" + tag(10, 1) + bytes(8) + tag(11, 5) + bytes(4) + ld(12, b"zz")
    features = ld(1, ld(1, b"n") + ld(2, ld(3, int64_list) + unknown)) + ld(1, ld(1, b"f") + ld(2, ld(2, float_list)))
    got = tfr.decode_example(ld(1, features) + unknown)
    assert got == {"n": tfr.int64_feature([7, 150]), "f": tfr.float_feature([1.5])}


@pytest.mark.parametrize("data", [b"\x0a\x05ab", b"\x0b", b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01"])
def test_malformed_bytes_raise(data):
    with pytest.raises(tfr.ProtobufDecodeError):
        tfr.decode_sequence_example(data)


def _reference_classes():
    """tf.train message classes built by the protobuf library from the field numbers of feature/example.proto."""
    pytest.importorskip("google.protobuf")
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    F = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(name="video_ens_test_example.proto", package="vetest", syntax="proto3")

    def message(name, *fields, nested=()):
        m = fdp.message_type.add(name=name)
        for fname, number, ftype, label, type_name, oneof in fields:
            f = m.field.add(name=fname, number=number, type=ftype, label=label)
            if type_name:
                f.type_name = type_name
            if oneof is not None:
                f.oneof_index = oneof
        for entry_name, value_type in nested:
            e = m.nested_type.add(name=entry_name)
            e.options.map_entry = True
            e.field.add(name="key", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
            e.field.add(name="value", number=2, type=F.TYPE_MESSAGE, label=F.LABEL_OPTIONAL, type_name=value_type)
        return m

    rep, opt = F.LABEL_REPEATED, F.LABEL_OPTIONAL
    message("BytesList", ("value", 1, F.TYPE_BYTES, rep, None, None))
    message("FloatList", ("value", 1, F.TYPE_FLOAT, rep, None, None))
    message("Int64List", ("value", 1, F.TYPE_INT64, rep, None, None))
    feature = message(
        "Feature",
        ("bytes_list", 1, F.TYPE_MESSAGE, opt, ".vetest.BytesList", 0),
        ("float_list", 2, F.TYPE_MESSAGE, opt, ".vetest.FloatList", 0),
        ("int64_list", 3, F.TYPE_MESSAGE, opt, ".vetest.Int64List", 0),
    )
    feature.oneof_decl.add(name="kind")
    message(
        "Features",
        ("feature", 1, F.TYPE_MESSAGE, rep, ".vetest.Features.FeatureEntry", None),
        nested=[("FeatureEntry", ".vetest.Feature")],
    )
    message("FeatureList", ("feature", 1, F.TYPE_MESSAGE, rep, ".vetest.Feature", None))
    message(
        "FeatureLists",
        ("feature_list", 1, F.TYPE_MESSAGE, rep, ".vetest.FeatureLists.FeatureListEntry", None),
        nested=[("FeatureListEntry", ".vetest.FeatureList")],
    )
    message(
        "SequenceExample",
        ("context", 1, F.TYPE_MESSAGE, opt, ".vetest.Features", None),
        ("feature_lists", 2, F.TYPE_MESSAGE, opt, ".vetest.FeatureLists", None),
    )
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("vetest.SequenceExample"))


def test_agrees_with_the_protobuf_library():
    SequenceExample = _reference_classes()
    # Our bytes, parsed by protobuf.
    ref = SequenceExample.FromString(tfr.encode_sequence_example(CONTEXT, LISTS))
    assert list(ref.context.feature["labels"].int64_list.value) == list(CONTEXT["labels"].values)
    assert ref.context.feature["id"].bytes_list.value[0] == b"Xy3a"
    assert list(ref.context.feature["score"].float_list.value) == [0.5, -2.25]
    assert [f.bytes_list.value[0] for f in ref.feature_lists.feature_list["rgb"].feature] == [
        f.values[0] for f in LISTS["rgb"]
    ]
    # Protobuf's bytes (packed int64/float, its own field order), parsed by us.
    msg = SequenceExample()
    msg.context.feature["id"].bytes_list.value.append(b"vid")
    msg.context.feature["labels"].int64_list.value.extend([3, -4, 2**40])
    msg.context.feature["w"].float_list.value.extend([0.25])
    for t in range(4):
        msg.feature_lists.feature_list["audio"].feature.add().bytes_list.value.append(bytes([t]) * 128)
    ex = tfr.decode_sequence_example(msg.SerializeToString())
    assert ex.context["id"] == tfr.bytes_feature([b"vid"])
    assert ex.context["labels"] == tfr.int64_feature([3, -4, 2**40])
    assert ex.context["w"] == tfr.float_feature([0.25])
    assert [f.values[0] for f in ex.feature_lists["audio"]] == [bytes([t]) * 128 for t in range(4)]
