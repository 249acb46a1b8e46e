"""One error mechanism: every ApiError class names a code and status of protocol/errors.py's
catalogue, no condition is written twice, and no message carries exception text or an unbounded
value the client sent."""

import ast
from pathlib import Path

import msgpack

from hpi import app  # noqa: F401  (imports every module that defines an error)
from hpi.errors import ApiError, SamplingMismatch, quoted
from hpi.protocol import errors as catalogue
from hpi.protocol import frames, javascript
from tests.http_errors import assert_error
from tests.test_api import USER


def error_classes() -> list[type[ApiError]]:
    found, todo = [], [ApiError]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if "code" in vars(cls):
            found.append(cls)
    return found


def test_every_error_class_is_in_the_catalogue_with_its_status():
    classes = error_classes()
    assert len(classes) > 40
    for cls in classes:
        assert cls.code in catalogue.BY_CODE, f"{cls.__name__}: {cls.code} is not in protocol/errors.py"
        assert cls.status in catalogue.BY_CODE[cls.code].statuses, cls.__name__


def test_no_condition_and_no_code_is_defined_twice():
    conditions = [(cls.code, cls.status) for cls in error_classes()]
    assert len(conditions) == len(set(conditions))
    codes = [e.code for e in catalogue.CATALOGUE]
    assert len(codes) == len(set(codes))
    # The catalogue's entries are all written out once in its source, none built elsewhere.
    calls = [n for n in ast.walk(ast.parse(Path(catalogue.__file__).read_text()))
             if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "ErrorCode"]
    assert sorted(c.args[0].value for c in calls) == sorted(codes)


def test_every_code_of_the_catalogue_has_a_class():
    assert {e.code for e in catalogue.CATALOGUE} == {cls.code for cls in error_classes()}


def test_the_fatal_sync_codes_are_the_ones_a_hello_cannot_cure():
    assert catalogue.FATAL == {"session_not_found", "unauthorized", "forbidden", "sampling_mismatch",
                               "api_key_required", "bad_api_key"}


def test_the_web_sdk_has_the_generated_catalogue():
    assert javascript.JS_MODULE.read_text() == javascript.javascript(), "run `python -m hpi.protocol.javascript`"


def test_an_error_is_the_same_over_http_and_as_a_frame():
    e = SamplingMismatch("a message")
    r = e.response()
    assert r.status_code == e.status
    frame = msgpack.unpackb(frames.encode(e.frame()))
    assert frame == {"v": 1, "type": "error", "code": e.code, "message": "a message"}


def test_values_the_client_sent_are_cut_in_messages(client):
    long = "x" * 10_000
    for r, status, code in [
        (client.get(f"/v1/models/{long}/pack"), 404, "unknown_model"),
        (client.get(f"/v1/sessions/{long}/hologram"), 404, "session_not_found"),
        (client.post("/v1/capture", json={"text": "Hi.", "activation": long}), 422, "unknown_activation"),
        (client.post("/v1/capture", json={"text": "Hi.", "states": [long] * 3}), 422, "unknown_states"),
        (client.delete(f"/v1/capture/collections/{long}", headers={"Authorization": "Bearer s"}), 404,
         "unknown_collection"),
    ]:
        error = assert_error(r, status, code)
        assert "x" * 72 not in error["message"] and len(error["message"]) < 2000, (code, error["message"])
    assert len(quoted(long)) == 72


def test_no_exception_text_reaches_a_frame():
    for data in (b"\xc1", b"\x82\xa1v\x01", msgpack.packb({"v": 1, "type": "hello"}) + b"\x00"):
        try:
            frames.decode(data)
        except frames.FrameError as e:
            assert str(e) == "not a msgpack frame"


def test_a_framework_refusal_has_a_fixed_message(client):
    error = assert_error(client.put("/v1/models"), 405, "method_not_allowed")
    assert error["message"] == "Method Not Allowed"
    assert client.post("/v1/sessions", json={"messages": USER}).status_code == 201
