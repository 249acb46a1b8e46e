"""The error shape every endpoint answers with: `{"error": {"code", "message"}}`."""


def assert_error(r, status: int, code: str) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code and error["message"]
    return error
