"""Tests for lmforge's own GGUF container parser (lmforge.io.gguf_file).

The reference is the `gguf` package: on the bundled SmolLM2 file our metadata, tensor
infos, tensor bytes and dequantized values must match `gguf.GGUFReader`; small files
written with `gguf.GGUFWriter` must round-trip; and damaged files must fail with one
LmforgeError, never a struct/Index/Unicode error.
"""

from __future__ import annotations

import random
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest

from conftest import default_gguf_path
from lmforge.errors import LmforgeError
from lmforge.io.gguf_file import GGUFFile, GGUFTensor

QT = gguf.GGMLQuantizationType
VT = gguf.GGUFValueType




@pytest.fixture(scope="module")
def model_path() -> Path:
    return default_gguf_path()


@pytest.fixture(scope="module")
def ours(model_path) -> GGUFFile:
    return GGUFFile(model_path)


@pytest.fixture(scope="module")
def reader(default_gguf_reader) -> gguf.GGUFReader:
    return default_gguf_reader  # slow to open (seconds): one for the session, in conftest


def _plain(value):
    """Normalise a metadata value for comparison (numpy arrays -> lists)."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


# --------------------------------------------------------------- default model file


def test_metadata_matches_gguf_reader(ours, reader):
    assert ours.version == 3
    reader_keys = [k for k in reader.fields if not k.startswith("GGUF.")]
    assert list(ours.metadata) == reader_keys  # same keys, same file order
    for key in reader_keys:
        field = reader.fields[key]
        expected = field.contents()
        got = ours.metadata[key]
        if field.types[0] == VT.ARRAY:
            if field.types[-1] == VT.STRING:
                assert isinstance(got, list) and all(isinstance(s, str) for s in got), key
            else:
                assert isinstance(got, np.ndarray), key
        else:
            assert type(got) is type(expected), key
        assert _plain(got) == expected, key
    assert len(ours.metadata["tokenizer.ggml.tokens"]) == 49152
    assert ours.metadata["tokenizer.ggml.token_type"].dtype == np.int32


def test_tensor_infos_and_bytes_match_gguf_reader(ours, reader):
    assert [t.name for t in ours.tensors] == [t.name for t in reader.tensors]
    for mine, ref in zip(ours.tensors, reader.tensors):
        assert isinstance(mine, GGUFTensor)
        assert mine.shape == tuple(reversed(ref.shape.tolist())), mine.name
        assert mine.qtype == ref.tensor_type and isinstance(mine.qtype, QT), mine.name
        assert mine.raw.dtype == np.uint8 and mine.raw.nbytes == ref.n_bytes, mine.name
        # Same bytes at the same place: our offsets and data-section start are right.
        assert np.array_equal(mine.raw, np.asarray(ref.data).reshape(-1).view(np.uint8))
    assert ours.tensor("token_embd.weight") is ours.tensors[0]


def test_raw_is_a_zero_copy_view(ours):
    t = ours.tensors[0]
    assert not t.raw.flags.owndata and not t.raw.flags.writeable


@pytest.mark.slow  # starts the model or a process: seconds
def test_to_numpy_matches_gguf_dequantize(ours, reader):
    by_type: dict[QT, list] = {}
    for ref in reader.tensors:
        by_type.setdefault(ref.tensor_type, []).append(ref)
    assert {QT.Q4_1, QT.Q8_0, QT.F32} <= set(by_type)
    for qtype in (QT.Q4_1, QT.Q8_0, QT.F32):
        refs = by_type[qtype]
        picks = {r.name: r for r in (refs[0], refs[len(refs) // 2], refs[-1])}
        for ref in picks.values():  # the only Q8_0 tensor is the (big) embedding
            mine = ours.tensor(ref.name).to_numpy()
            expected = gguf.quants.dequantize(ref.data, ref.tensor_type)
            assert mine.dtype == np.float32
            assert mine.shape == ours.tensor(ref.name).shape
            np.testing.assert_array_equal(mine, expected.reshape(mine.shape))
            assert mine.flags.writeable
            assert not np.shares_memory(mine, ours.tensor(ref.name).raw)


def test_unknown_tensor_name(ours):
    with pytest.raises(LmforgeError, match="no tensor named 'nope'"):
        ours.tensor("nope")


# ------------------------------------------------------------ written tiny files

_TENSORS = {
    "w.f32": (np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 7, QT.F32),
    "w.f16": (np.linspace(-2, 2, 64, dtype=np.float32).reshape(4, 16), QT.F16),
    "w.bf16": (np.linspace(-3, 3, 32, dtype=np.float32).reshape(2, 16), QT.BF16),
    "w.q8_0": (np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32), QT.Q8_0),
    "v.f32": (np.array([1.5, -2.25, 3.0], dtype=np.float32), QT.F32),
}


def _write_tiny(path: Path, alignment: int | None = None) -> Path:
    w = gguf.GGUFWriter(str(path), "llama")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    w.add_uint8("t.u8", 250)
    w.add_int8("t.i8", -100)
    w.add_uint16("t.u16", 65000)
    w.add_int16("t.i16", -32000)
    w.add_uint32("t.u32", 4_000_000_000)
    w.add_int32("t.i32", -2_000_000_000)
    w.add_float32("t.f32", 0.1)
    w.add_uint64("t.u64", 2**63 + 5)
    w.add_int64("t.i64", -(2**62))
    w.add_float64("t.f64", 0.1)
    w.add_bool("t.true", True)
    w.add_bool("t.false", False)
    w.add_string("t.str", "héllo ✓")
    w.add_key_value("t.empty", "", VT.STRING)  # add_string() skips empty strings
    w.add_array("t.strs", ["a", "", "ünï", "Ġthe", "<|im_end|>"])
    w.add_key_value("t.u64s", [1, 2, 2**64 - 1], VT.ARRAY, sub_type=VT.UINT64)
    w.add_key_value("t.i16s", [-1, 0, 7], VT.ARRAY, sub_type=VT.INT16)
    w.add_array("t.f32s", [0.5, -1.25])
    w.add_array("t.bools", [True, False, True])
    w.add_key_value("t.nested", [[1, 2], [3]], VT.ARRAY, sub_type=VT.ARRAY)
    for name, (data, qtype) in _TENSORS.items():
        if qtype in (QT.F32, QT.F16):
            w.add_tensor(name, data.astype(np.float16 if qtype == QT.F16 else np.float32))
        else:
            w.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def tiny(tmp_path) -> Path:
    return _write_tiny(tmp_path / "tiny.gguf")


@pytest.mark.parametrize("alignment", [None, 64])
def test_round_trip_written_file(tmp_path, alignment):
    path = _write_tiny(tmp_path / "tiny.gguf", alignment)
    f = GGUFFile(path)
    md = f.metadata
    assert f.version == 3
    assert f.alignment == (alignment or 32) and f.data_offset % f.alignment == 0
    assert md["general.architecture"] == "llama"
    assert md["t.u8"] == 250 and md["t.i8"] == -100
    assert md["t.u16"] == 65000 and md["t.i16"] == -32000
    assert md["t.u32"] == 4_000_000_000 and md["t.i32"] == -2_000_000_000
    assert md["t.f32"] == float(np.float32(0.1)) and md["t.f64"] == 0.1
    assert md["t.u64"] == 2**63 + 5 and md["t.i64"] == -(2**62)
    assert md["t.true"] is True and md["t.false"] is False
    assert md["t.str"] == "héllo ✓" and md["t.empty"] == ""
    assert md["t.strs"] == ["a", "", "ünï", "Ġthe", "<|im_end|>"]
    assert md["t.u64s"].dtype == np.uint64 and md["t.u64s"].tolist() == [1, 2, 2**64 - 1]
    assert md["t.i16s"].dtype == np.int16 and md["t.i16s"].tolist() == [-1, 0, 7]
    assert md["t.f32s"].dtype == np.float32 and md["t.f32s"].tolist() == [0.5, -1.25]
    assert md["t.bools"].dtype == np.bool_ and md["t.bools"].tolist() == [True, False, True]
    assert _plain(md["t.nested"]) == [[1, 2], [3]]
    if alignment:
        assert md["general.alignment"] == alignment

    assert [t.name for t in f.tensors] == list(_TENSORS)
    for name, (data, qtype) in _TENSORS.items():
        t = f.tensor(name)
        assert t.shape == data.shape and t.qtype == qtype
        got = t.to_numpy()
        assert got.dtype == np.float32 and got.shape == data.shape
        if qtype == QT.F32:
            np.testing.assert_array_equal(got, data)
        elif qtype == QT.F16:
            np.testing.assert_array_equal(got, data.astype(np.float16).astype(np.float32))
        else:
            expected = gguf.quants.dequantize(gguf.quants.quantize(data, qtype), qtype)
            np.testing.assert_array_equal(got, expected)

    # gguf's own reader agrees with us on the file we both understand.
    ref = gguf.GGUFReader(str(path))
    for key, field in ref.fields.items():
        # GGUFReader flattens arrays of arrays (its contents() has a FIXME for that).
        if not key.startswith("GGUF.") and key != "t.nested":
            assert _plain(md[key]) == field.contents(), key
    for mine, r in zip(f.tensors, ref.tensors):
        assert np.array_equal(mine.raw, np.asarray(r.data).reshape(-1).view(np.uint8))


def test_version_2_is_read_like_version_3(tmp_path, tiny):
    blob = bytearray(tiny.read_bytes())
    assert blob[4:8] == struct.pack("<I", 3)
    blob[4:8] = struct.pack("<I", 2)  # v3 only added big-endian files; layout is equal
    (tmp_path / "v2.gguf").write_bytes(blob)
    f2, f3 = GGUFFile(tmp_path / "v2.gguf"), GGUFFile(tiny)
    assert f2.version == 2
    assert f2.metadata["t.strs"] == f3.metadata["t.strs"]
    assert list(f2.metadata) == list(f3.metadata)
    assert [(t.name, t.shape, t.qtype) for t in f2.tensors] == [
        (t.name, t.shape, t.qtype) for t in f3.tensors
    ]
    np.testing.assert_array_equal(f2.tensor("w.f32").to_numpy(), _TENSORS["w.f32"][0])


def test_type_gguf_cannot_dequantize(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "i32.gguf"), "llama")
    w.add_tensor("ids", np.arange(8, dtype=np.int32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    t = GGUFFile(tmp_path / "i32.gguf").tensor("ids")
    assert t.qtype == QT.I32 and t.raw.view(np.int32).tolist() == list(range(8))
    with pytest.raises(LmforgeError, match="cannot dequantize"):
        t.to_numpy()


# ------------------------------------------------------------------ corrupt files


def _expect_error(path: Path, match: str | None = None) -> LmforgeError:
    with pytest.raises(LmforgeError, match=match) as info:
        GGUFFile(path)
    assert "\n" not in str(info.value)
    return info.value


def test_missing_file(tmp_path):
    _expect_error(tmp_path / "nope.gguf", "not found")
    _expect_error(tmp_path, "directory")


def test_empty_file(tmp_path):
    (tmp_path / "e.gguf").write_bytes(b"")
    _expect_error(tmp_path / "e.gguf", "empty")


def test_wrong_magic(tmp_path, tiny):
    blob = bytearray(tiny.read_bytes())
    blob[:4] = b"GGML"
    (tmp_path / "bad.gguf").write_bytes(blob)
    _expect_error(tmp_path / "bad.gguf", "not a GGUF file")


def test_random_bytes(tmp_path):
    rng = random.Random(1234)
    for i in range(20):
        (tmp_path / "r.gguf").write_bytes(rng.randbytes(rng.randrange(1, 5000)))
        _expect_error(tmp_path / "r.gguf")


def test_unsupported_versions(tmp_path):
    path = tmp_path / "v.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<I", 1) + bytes(64))
    _expect_error(path, "version 1")
    path.write_bytes(b"GGUF" + struct.pack("<I", 7) + bytes(64))
    _expect_error(path, "version 7")
    path.write_bytes(b"GGUF" + struct.pack(">IQQ", 3, 0, 0))
    _expect_error(path, "big-endian")


def test_truncated_default_model(tmp_path, model_path):
    with open(model_path, "rb") as fh:
        head = fh.read(1 << 20)
    (tmp_path / "cut.gguf").write_bytes(head)
    _expect_error(tmp_path / "cut.gguf", "truncated or corrupt")


def test_truncated_in_tensor_infos(tmp_path, tiny):
    blob = tiny.read_bytes()
    # Tensor names occur only in the tensor-info section: cut mid-name.
    cut = blob.index(b"w.bf16") + 3
    assert cut < GGUFFile(tiny).data_offset
    (tmp_path / "cut.gguf").write_bytes(blob[:cut])
    _expect_error(tmp_path / "cut.gguf", "truncated or corrupt")


def test_truncated_tensor_data(tmp_path, tiny):
    blob = tiny.read_bytes()
    last = GGUFFile(tiny).tensors[-1]
    # Cut off the last byte of the last tensor's data (the writer pads after it, so
    # simply dropping the file's last bytes would only remove padding).
    end = blob.rindex(last.raw.tobytes()) + last.raw.nbytes - 1
    (tmp_path / "cut.gguf").write_bytes(blob[:end])
    _expect_error(tmp_path / "cut.gguf", "runs past the end of the file")


def test_every_truncation_and_bit_flip_is_an_lmforge_error(tmp_path, tiny):
    """Fuzz: any prefix, and random byte corruption, either parses or raises LmforgeError."""
    blob = tiny.read_bytes()
    path = tmp_path / "fuzz.gguf"
    data_offset = GGUFFile(tiny).data_offset
    last = GGUFFile(tiny).tensors[-1]
    data_end = blob.rindex(last.raw.tobytes()) + last.raw.nbytes
    # Every cut inside the header/metadata/tensor infos, a sample inside the data.
    cuts = [*range(1, data_offset + 1), *range(data_offset + 1, data_end, 13)]
    for n in cuts:
        path.write_bytes(blob[:n])
        _expect_error(path)  # every prefix that loses a byte of data is incomplete
    rng = random.Random(99)
    for _ in range(200):
        bad = bytearray(blob)
        for _ in range(rng.randrange(1, 4)):
            pos = rng.randrange(4, data_offset)
            bad[pos] = rng.randrange(256)
        path.write_bytes(bad)
        try:
            f = GGUFFile(path)
        except LmforgeError:
            continue
        for t in f.tensors:  # parsed: dequantizing must also behave
            try:
                t.to_numpy()
            except LmforgeError:
                pass


def test_vocabulary_only_file_without_tensors(tmp_path):
    """Vocabulary-only GGUFs (tokenizer metadata, no tensors) may end right after the metadata."""
    import gguf

    from lmforge.io.gguf_file import GGUFFile

    path = tmp_path / "vocab.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_string("tokenizer.ggml.model", "gpt2")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    f = GGUFFile(path)
    assert f.tensors == [] and f.metadata["tokenizer.ggml.model"] == "gpt2"
