"""In-process HTTP clients of the anchor app, addressed by a host name the anchor trusts by default."""

from fastapi.testclient import TestClient


class AppClient(TestClient):
    def websocket_connect(self, url: str, *args, **kwargs):
        # TestClient names its websockets' host "testserver" unless the URL is absolute.
        return super().websocket_connect(url if "://" in url else "ws://localhost" + url, *args, **kwargs)


def app_client(app, **kwargs) -> AppClient:
    return AppClient(app, base_url="http://localhost", **kwargs)
