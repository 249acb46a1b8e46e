import os
from pathlib import Path

import pytest

# Built model packs are cached per model and code version; keep the tests' copies in the
# work tree (git-ignored), so a second run reuses the real model's pack.
os.environ.setdefault("HPI_DATA_DIR", str(Path(__file__).resolve().parent.parent / "var" / "test-data"))

from tests.tiny_model import build_tiny_llama


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """An HF folder with a tiny random Llama and a BPE tokenizer trained on repo text."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "llama")


@pytest.fixture(scope="session")
def tiny(tiny_model_dir):
    from hpi.models import load_model
    return load_model(str(tiny_model_dir), device="cpu")


@pytest.fixture(scope="session")
def smollm():
    """The real default model (SmolLM2-135M-Instruct, packaged GGUF); loaded once per run."""
    from hpi.models import load_model
    return load_model("default", device="cpu")


@pytest.fixture(scope="session")
def smollm_anchor(smollm):
    """An anchor on the real model; its pack is cached where `hpi serve` keeps it."""
    from hpi.anchor import Anchor
    from hpi.config import Settings
    return Anchor(smollm, **Settings().anchor_options())


@pytest.fixture(scope="session")
def browser():
    """Headless Chromium with WebGPU on SwiftShader, shared by the browser tests."""
    from hpi.headless import launch
    with launch() as b:
        yield b


@pytest.fixture(scope="session")
def tiny_server(tiny, tmp_path_factory):
    """The real anchor app on the tiny model, on a loopback port: (base URL, anchor). Its session
    transcripts go to a directory of this run, so sessions never pile up across runs."""
    from hpi.anchor import Anchor
    from hpi.app import create_app
    from hpi.config import Settings
    from hpi.headless import serve
    anchor = Anchor(tiny)
    settings = Settings(sessions_dir=str(tmp_path_factory.mktemp("tiny-sessions")))
    with serve(create_app(settings, anchor)) as url:
        yield url, anchor


@pytest.fixture(scope="session")
def smollm_server(smollm_anchor, tmp_path_factory):
    """The real anchor app on SmolLM2: (base URL, anchor); session transcripts as for tiny_server."""
    from hpi.app import create_app
    from hpi.config import Settings
    from hpi.headless import serve
    settings = Settings(sessions_dir=str(tmp_path_factory.mktemp("smollm-sessions")))
    with serve(create_app(settings, smollm_anchor)) as url:
        yield url, smollm_anchor


@pytest.fixture
def page(browser, tiny_server):
    """A page of its own browser context (own IndexedDB), on the tiny anchor's origin."""
    context = browser.new_context()
    page = context.new_page()
    page.goto(tiny_server[0] + "/healthz")
    yield page
    context.close()


@pytest.fixture(scope="session")
def tiny_anchor(tiny):
    from hpi.anchor import Anchor
    return Anchor(tiny)


@pytest.fixture
def make_client(tiny_anchor, tmp_path):
    """HTTP clients of the app on the tiny anchor (lifespan run). Each app starts without
    transcripts; they share one memories directory, so a second one sees the first's memories."""
    from tests.app_client import app_client

    from hpi.app import create_app
    from hpi.config import Settings
    clients = []

    def make(**settings):
        sessions = tmp_path / f"sessions-{len(clients)}"
        app = create_app(Settings(sessions_dir=str(sessions), memories_dir=str(tmp_path / "memories"), **settings),
                         tiny_anchor)
        client = app_client(app).__enter__()
        clients.append(client)
        return client

    yield make
    for c in clients:
        c.__exit__(None, None, None)


@pytest.fixture
def client(make_client):
    return make_client()
