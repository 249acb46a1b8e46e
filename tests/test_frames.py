"""Frames of the reconciliation channel (protocol/frames.py): strict typing, as SPEC says.

Every defect of a frame from the page is a FrameError naming the field, never a coercion
and never another exception type.
"""

from __future__ import annotations

import random

import msgpack
import pytest

from hpi.protocol import frames
from hpi.protocol.frames import MAX_FRAME_BYTES, Draft, FrameError, Hello, decode, encode

CHAIN = bytes(range(32))
HELLO = {"v": 1, "type": "hello", "token": "s3cret", "position": 34, "chain": CHAIN,
         "temperature": 0.5, "seed": 7}
DRAFT = {"v": 1, "type": "draft", "position": 34, "chain": CHAIN, "tokens": [5, 0, 2**31 - 1]}


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def test_max_frame_bytes_is_64_kib():
    assert MAX_FRAME_BYTES == 64 * 1024


@pytest.mark.parametrize("frame", [HELLO, DRAFT], ids=["hello", "draft"])
def test_valid_frames_round_trip(frame):
    got = decode(pack(frame))
    assert isinstance(got, Hello if frame["type"] == "hello" else Draft)
    assert got.model_dump() == frame
    assert decode(encode(got)) == got


def test_hello_defaults_and_integer_temperature():
    # A JS page encodes 0 and 1.0 as msgpack integers: a number is a number.
    minimal = {k: v for k, v in HELLO.items() if k not in ("temperature", "seed")}
    got = decode(pack(minimal))
    assert (got.temperature, got.seed) == (0.0, 0)
    got = decode(pack({**HELLO, "temperature": 1, "seed": 2**32 - 1}))
    assert got.temperature == 1.0 and type(got.temperature) is float and got.seed == 2**32 - 1
    assert decode(pack({**HELLO, "temperature": 2})).temperature == 2.0


def test_frames_built_by_the_anchor_encode_as_spec_says():
    ready = frames.Ready(v=1, position=3, chain=CHAIN, tokens=[1, 2])
    assert msgpack.unpackb(encode(ready), raw=False) == {
        "v": 1, "type": "ready", "position": 3, "chain": CHAIN, "tokens": [1, 2], "refresh": False}
    raw = msgpack.unpackb(encode(ready), raw=True)
    assert isinstance(raw[b"chain"], bytes) and isinstance(raw[b"type"], bytes)  # bin vs str


CASES = {
    "v_true": ({**HELLO, "v": True}, "v"),
    "v_2": ({**HELLO, "v": 2}, "v"),
    "v_float": ({**DRAFT, "v": 1.0}, "v"),
    "v_string": ({**DRAFT, "v": "1"}, "v"),
    "v_missing": ({k: v for k, v in HELLO.items() if k != "v"}, "v"),
    "temperature_tiny": ({**HELLO, "temperature": 1e-30}, "temperature"),  # it overflowed the sampler's scores
    "position_string": ({**HELLO, "position": "34"}, "position"),
    "position_float": ({**HELLO, "position": 34.0}, "position"),
    "position_true": ({**HELLO, "position": True}, "position"),
    "position_negative": ({**DRAFT, "position": -1}, "position"),
    "draft_position_string": ({**DRAFT, "position": "34"}, "position"),
    "token_string": ({**DRAFT, "tokens": ["5"]}, "tokens.0"),
    "token_negative": ({**DRAFT, "tokens": [1, -1]}, "tokens.1"),
    "token_too_big": ({**DRAFT, "tokens": [2**31]}, "tokens.0"),
    "token_true": ({**DRAFT, "tokens": [True]}, "tokens.0"),
    "token_float": ({**DRAFT, "tokens": [5.0]}, "tokens.0"),
    "tokens_empty": ({**DRAFT, "tokens": []}, "tokens"),
    "tokens_too_many": ({**DRAFT, "tokens": [1] * (frames.MAX_DRAFT + 1)}, "tokens"),
    "tokens_not_a_list": ({**DRAFT, "tokens": 5}, "tokens"),
    "tokens_bin": ({**DRAFT, "tokens": b"\x05"}, "tokens"),
    "chain_str": ({**HELLO, "chain": "x" * 32}, "chain"),
    "chain_31_bytes": ({**HELLO, "chain": CHAIN[:31]}, "chain"),
    "chain_33_bytes": ({**DRAFT, "chain": CHAIN + b"\x00"}, "chain"),
    "chain_list": ({**DRAFT, "chain": list(CHAIN)}, "chain"),
    "temperature_string": ({**HELLO, "temperature": "0.5"}, "temperature"),
    "temperature_true": ({**HELLO, "temperature": True}, "temperature"),
    "temperature_above_2": ({**HELLO, "temperature": 2.5}, "temperature"),
    "temperature_negative": ({**HELLO, "temperature": -0.1}, "temperature"),
    "temperature_nan": ({**HELLO, "temperature": float("nan")}, "temperature"),
    "temperature_inf": ({**HELLO, "temperature": float("inf")}, "temperature"),
    "seed_true": ({**HELLO, "seed": True}, "seed"),
    "seed_float": ({**HELLO, "seed": 7.0}, "seed"),
    "seed_negative": ({**HELLO, "seed": -1}, "seed"),
    "seed_u32_overflow": ({**HELLO, "seed": 2**32}, "seed"),
    "session_token_bin": ({**HELLO, "token": b"s3cret"}, "token"),
    "session_token_int": ({**HELLO, "token": 5}, "token"),
    "session_token_too_long": ({**HELLO, "token": "x" * 257}, "token"),
    "unknown_key": ({**HELLO, "extra": 1}, "extra"),
    "unknown_key_draft": ({**DRAFT, "refresh": False}, "refresh"),
    "missing_chain": ({k: v for k, v in DRAFT.items() if k != "chain"}, "chain"),
    "unknown_type": ({**HELLO, "type": "ready"}, "type"),
    "type_missing": ({k: v for k, v in DRAFT.items() if k != "type"}, "type"),
    "type_bin": ({**DRAFT, "type": b"draft"}, "type"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_loose_fields_are_frame_errors_naming_the_field(case):
    frame, field = CASES[case]
    with pytest.raises(FrameError) as e:
        decode(pack(frame))
    assert str(e.value).startswith(f"{field}:") or f"; {field}:" in str(e.value), str(e.value)


@pytest.mark.parametrize("data, phrase", [
    (pack([1, 2]), "msgpack map"),
    (pack("hello"), "msgpack map"),
    (pack(None), "msgpack map"),
    (b"", "not a msgpack frame"),
    (b"\xc1", "not a msgpack frame"),  # a byte msgpack never uses
    (b"\x82\xa1v\x01", "not a msgpack frame"),  # a map cut short
    (pack(HELLO) + b"\x00", "not a msgpack frame"),  # trailing bytes
    (b"\x91" * 60_000, "not a msgpack frame"),  # nested deeper than msgpack's stack
    (pack({1: 2}), "not a msgpack frame"),  # map keys are strings
    (b"\x81\xa1v\xa3\xff\xfe\xfd", "not a msgpack frame"),  # str that is not UTF-8
    (pack({**DRAFT, "pad": b"x" * MAX_FRAME_BYTES}), f"the limit is {MAX_FRAME_BYTES}"),
], ids=["array", "string", "nil", "empty", "reserved_byte", "truncated", "trailing", "deep",
        "int_key", "bad_utf8", "too_large"])
def test_frames_that_are_not_msgpack_maps_or_too_large(data, phrase):
    with pytest.raises(FrameError, match=phrase):
        decode(data)


def test_size_limit_is_exact():
    base = pack({**DRAFT, "tokens": [1]})
    pad = MAX_FRAME_BYTES - len(base) - len(pack("pad")) - 3  # bin 16: 3 header bytes
    at_limit = pack({**DRAFT, "tokens": [1], "pad": b"x" * pad})
    assert len(at_limit) == MAX_FRAME_BYTES
    with pytest.raises(FrameError, match="pad: Extra inputs"):  # parsed: not refused for its size
        decode(at_limit)
    with pytest.raises(FrameError, match="the limit is"):
        decode(at_limit + b"\x00")


def test_not_bytes_is_a_frame_error():
    with pytest.raises(FrameError):
        decode("text frame")  # type: ignore[arg-type]


def test_random_frames_raise_only_frame_errors():
    """Mutations of valid frames and random bytes: a frame or a FrameError, nothing else."""
    rng = random.Random(1234)
    seeds = [pack(HELLO), pack(DRAFT), pack({**DRAFT, "tokens": list(range(256))})]
    odd = [True, False, None, -1, 0, 2**31, 2**32, 2**64 - 1, -(2**63), 0.5, float("nan"), "34",
           "", b"", CHAIN, CHAIN[:31], [], [1], {}, {"a": 1}, "x" * 32]
    ok = 0
    for _ in range(3000):
        choice = rng.random()
        if choice < 0.3:
            data = bytearray(rng.choice(seeds))
            for _ in range(rng.randint(1, 4)):
                pos = rng.randrange(len(data) + 1)
                op = rng.random()
                if op < 0.5 and pos < len(data):
                    data[pos] = rng.randrange(256)
                elif op < 0.75:
                    del data[pos:]
                else:
                    data[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
            data = bytes(data)
        elif choice < 0.8:
            frame = dict(rng.choice([HELLO, DRAFT]))
            for _ in range(rng.randint(1, 3)):
                frame[rng.choice(list(frame) + ["extra"])] = rng.choice(odd)
            data = pack(frame)
        else:
            data = bytes(rng.randrange(256) for _ in range(rng.randint(0, 64)))
        try:
            got = decode(data)
        except FrameError as e:
            assert str(e)
            continue
        ok += 1
        # Whatever was accepted has exactly the SPEC's types.
        assert type(got.v) is int and got.v == 1 and type(got.position) is int and got.position >= 0
        assert type(got.chain) is bytes and len(got.chain) == 32
        if isinstance(got, Draft):
            assert all(type(t) is int and 0 <= t < 2**31 for t in got.tokens)
        else:
            assert type(got.temperature) is float and 0 <= got.temperature <= 2
            assert type(got.seed) is int and 0 <= got.seed < 2**32
    assert ok > 0


def test_model_classes_refuse_a_boolean_version():
    with pytest.raises(Exception, match="frame version"):
        Hello(v=True, type="hello", token="t", position=0, chain=CHAIN)
    with pytest.raises(Exception, match="frame version"):
        frames.Ready(v=True, position=0, chain=CHAIN, tokens=[])
