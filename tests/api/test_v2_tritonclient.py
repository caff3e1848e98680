"""The Open Inference Protocol against a real `equipoise serve` (tiny exported models), spoken by the real
`tritonclient` (http): health, metadata, MELD texts inferred on the champion and on a challenger called by its
version, answered exactly as /v1 answers them, and bad requests refused with the protocol's error."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from core.db import migrate
from core.db.session import make_engine
from model.registry import ModelRegistry
from tests.api.conftest import Server, running_server, wait_for
from tests.api.test_server import wav

pytestmark = [pytest.mark.slow, pytest.mark.data]

CHALLENGER = "tiny-0.2"
MELD_TEXTS = 24


@pytest.fixture(scope="module")
def challenger_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second tiny model (other weights, so other answers), registered beside the champion but not promoted."""
    import torch

    from model.artifact import export_artifact
    from model.labels import EMOTIONS
    from model.network import EmotionModel, ModelConfig

    torch.manual_seed(1)
    model = EmotionModel(ModelConfig.tiny()).eval()
    path = tmp_path_factory.mktemp("challenger") / CHALLENGER
    shares = dict.fromkeys(EMOTIONS, 1 / len(EMOTIONS))
    export_artifact(
        model, path, version=CHALLENGER, reference_distribution=shares, metrics={"macro_f1": 0.0}, int8=False
    )
    return path


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, tiny_artifact: Path, challenger_artifact: Path
) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("v2-server")
    url = f"sqlite:///{root / 'equipoise.db'}"
    migrate.upgrade(url)
    engine = make_engine(url)
    registry = ModelRegistry(engine, root / "state" / "models")
    registry.promote(registry.register(tiny_artifact).version)
    registry.register(challenger_artifact)
    engine.dispose()
    with running_server(root / "state", url, batch_max_wait_ms="5") as running:
        yield running


@pytest.fixture(scope="module")
def client(server: Server) -> Iterator[triton.InferenceServerClient]:
    triton_client = triton.InferenceServerClient(url=server.url.removeprefix("http://"), network_timeout=60)
    yield triton_client
    triton_client.close()


@pytest.fixture(scope="module")
def meld_texts(data_dir: Path) -> list[str]:
    from model.data import meld

    return meld.texts(data_dir, ("test",))[:MELD_TEXTS]


def text_input(texts: list[str], name: str = "text", binary: bool = True) -> triton.InferInput:
    tensor = triton.InferInput(name, [len(texts)], "BYTES")
    tensor.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=np.object_), binary_data=binary)
    return tensor


def v1_answers(server: Server, texts: list[str]) -> list[dict]:
    with server.client() as http:
        return [http.post("/v1/predict/utterance", json={"text": text}).raise_for_status().json() for text in texts]


def assert_same_as_v1(result: triton.InferResult, v1: list[dict]) -> None:
    labels = [label.decode() if isinstance(label, bytes) else label for label in result.as_numpy("label")]
    assert labels == [answer["emotion"] for answer in v1]
    expected = np.array([list(answer["probabilities"].values()) for answer in v1])
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected, atol=1e-5)


def test_health_and_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.get_server_metadata()["name"] == "equipoise"
    assert client.is_model_ready("equipoise")
    assert client.is_model_ready("equipoise", CHALLENGER)
    assert not client.is_model_ready("equipoise", "no-such-version")
    assert not client.is_model_ready("other")
    metadata = client.get_model_metadata("equipoise")
    assert sorted(metadata["versions"]) == ["tiny-0.1", CHALLENGER]
    (probabilities,) = [output for output in metadata["outputs"] if output["name"] == "probabilities"]
    assert probabilities["parameters"]["labels"] == [
        "neutral",
        "joy",
        "surprise",
        "anger",
        "sadness",
        "disgust",
        "fear",
    ]
    assert client.get_model_metadata("equipoise", CHALLENGER)["parameters"] == {"version": CHALLENGER}


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_meld_texts_on_the_champion_answer_as_v1(
    server: Server, client: triton.InferenceServerClient, meld_texts: list[str], binary: bool
) -> None:
    outputs = [triton.InferRequestedOutput(name, binary_data=binary) for name in ("label", "probabilities")]
    result = client.infer("equipoise", [text_input(meld_texts, binary=binary)], outputs=outputs)
    assert result.get_response()["model_version"] == "tiny-0.1"
    assert_same_as_v1(result, v1_answers(server, meld_texts))


@pytest.mark.parametrize("compression", ["gzip", "deflate"])
def test_a_compressed_request_answers_as_v1(
    server: Server, client: triton.InferenceServerClient, meld_texts: list[str], compression: str
) -> None:
    result = client.infer(
        "equipoise",
        [text_input(meld_texts)],
        request_compression_algorithm=compression,
        response_compression_algorithm=compression,  # asked for; the answer comes uncompressed, which it reads
    )
    assert_same_as_v1(result, v1_answers(server, meld_texts))


def test_audio_rows_answer_as_v1(server: Server, client: triton.InferenceServerClient) -> None:
    audio = wav(0.8, pitch=3.0)
    texts = ["I need this fixed today.", ""]
    audio_input = triton.InferInput("audio", [2], "BYTES")
    audio_input.set_data_from_numpy(np.array([b"", audio], dtype=np.object_))
    result = client.infer("equipoise", [text_input(texts), audio_input])
    with server.client() as http:
        v1 = [
            http.post("/v1/predict/utterance", json={"text": texts[0]}).json(),
            http.post("/v1/predict/utterance", json={"audio": base64.b64encode(audio).decode()}).json(),
        ]
    assert_same_as_v1(result, v1)


def test_a_challenger_called_by_name_answers_as_v1_once_it_is_promoted(
    server: Server, client: triton.InferenceServerClient, meld_texts: list[str]
) -> None:
    challenger = client.infer("equipoise", [text_input(meld_texts)], model_version=CHALLENGER)
    champion = client.infer("equipoise", [text_input(meld_texts)])
    assert challenger.get_response()["model_version"] == CHALLENGER
    assert not np.allclose(challenger.as_numpy("probabilities"), champion.as_numpy("probabilities"), atol=1e-3)
    with server.client() as http:
        assert http.post(f"/v1/models/{CHALLENGER}/promote").status_code == 200
        wait_for(lambda: http.get("/readyz").json().get("model_version") == CHALLENGER, timeout_s=30)
    try:
        assert_same_as_v1(challenger, v1_answers(server, meld_texts))
        assert client.infer("equipoise", [text_input(meld_texts[:2])]).get_response()["model_version"] == CHALLENGER
    finally:
        with server.client() as http:
            assert http.post("/v1/models/tiny-0.1/promote").status_code == 200
            wait_for(lambda: http.get("/readyz").json().get("model_version") == "tiny-0.1", timeout_s=30)


def test_bad_requests_raise_the_servers_message(server: Server, client: triton.InferenceServerClient) -> None:
    wrong_type = triton.InferInput("text", [2], "FP32")
    wrong_type.set_data_from_numpy(np.zeros(2, dtype=np.float32))
    unknown = triton.InferInput("transcript", [1], "BYTES")
    unknown.set_data_from_numpy(np.array([b"hello"], dtype=np.object_))
    mismatch = [text_input(["a", "b"]), text_input(["customer"], "speaker")]
    cases = [
        ([wrong_type], None, "400", "is BYTES, not FP32"),
        ([unknown], None, "400", "unknown input 'transcript'"),
        (mismatch, None, "400", "same number of rows"),
        ([text_input(["x" * 2_001])], None, "413", "the limit is 2000"),
        ([text_input(["hello"])], "no-such-version", "404", "unknown version 'no-such-version'"),
    ]
    for inputs, version, status, message in cases:
        with pytest.raises(InferenceServerException) as raised:
            client.infer("equipoise", inputs, model_version=version or "")
        assert raised.value.status() == status and message in raised.value.message(), raised.value
    with pytest.raises(InferenceServerException) as raised:
        client.infer("other-model", [text_input(["hello"])])
    assert raised.value.status() == "404"
    log = server.log()
    assert "Traceback" not in log and " 500 " not in log
