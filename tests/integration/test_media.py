"""Images and audio end to end, on tiny random-weight models built here
(`benchmarks/tiny_model.py`: a vision-language model of Idefics3's architecture,
an audio-language model of Qwen2-Audio's; served with LOAD_FORMAT=dummy). Random
weights say nothing, so what proves that a picture or a clip reached the model is
the prompt: each image adds the same number of prompt tokens (its patches),
whichever way it came (a data URL, an `http` URL served on loopback by the test,
a Responses `input_image`, an Anthropic `image` block, a RunPod job), and a clip
adds tokens in proportion to its length, whatever its sample rate."""

from __future__ import annotations

import base64
import functools
import http.server
import io
import sys
import threading

import anthropic
import numpy as np
import openai
import soundfile
import pytest
from PIL import Image

from support import ENGINE_START_TIMEOUT_S, ROOT, Proc, child_env, free_port, wait_healthy
from support.runpod_queue import JobQueue

sys.path.insert(0, str(ROOT / "benchmarks"))
import tiny_model  # noqa: E402

VLM = "tiny-vlm"
ALM = "tiny-audio"
MAX_PIXELS = 200 * 200  # VLLM_MAX_IMAGE_PIXELS: a larger image is refused
ASK = "Describe the picture."


def png(color: str, size: tuple[int, int] = (48, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def data_url(raw: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(raw).decode()


def image(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


@pytest.fixture(scope="module")
def media_url(tmp_path_factory):
    """A loopback HTTP server with two pictures (and nothing else: 404)."""
    root = tmp_path_factory.mktemp("media")
    (root / "red.png").write_bytes(png("red"))
    (root / "broken.png").write_bytes(b"not a picture")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def vlm(tmp_path_factory, run_dir):
    """One engine serving the tiny VLM, an HTTP gateway and a RunPod worker in front of it."""
    folder = tiny_model.build_vlm(tmp_path_factory.mktemp("tiny-vlm"))
    endpoint = f"ipc://{run_dir}/engine-vlm"
    engine = Proc("engine-vlm", ["vllm_gateway.engine", "--endpoint", endpoint],
                  child_env(MODEL_NAME=str(folder), LOAD_FORMAT="dummy", SERVED_MODEL_NAME=VLM,
                            LIMIT_MM_PER_PROMPT='{"image": 2}', VLLM_MAX_IMAGE_PIXELS=str(MAX_PIXELS)),
                  run_dir, own_group=True)
    port = free_port()
    gateway = Proc("gateway-vlm", ["vllm_gateway.gateway", "http", "--port", str(port), "--engine-endpoints", endpoint],
                   child_env(), run_dir)
    url = f"http://127.0.0.1:{port}"
    queue = JobQueue()
    cwd = run_dir / "runpod-vlm"
    cwd.mkdir(exist_ok=True)
    worker = Proc("runpod-vlm", ["vllm_gateway.gateway", "runpod"],
                  child_env(ENGINE_ENDPOINTS=endpoint, **queue.env()), run_dir, cwd=cwd)
    try:
        wait_healthy(url, [engine, gateway, worker], ENGINE_START_TIMEOUT_S)
        yield url, queue
    finally:
        for p in (worker, gateway, engine):
            p.stop()
        queue.close()


@pytest.fixture(scope="module")
def chat(vlm):
    return openai.OpenAI(base_url=vlm[0] + "/v1", api_key="unused", max_retries=0, timeout=120)


def prompt_tokens(chat, content) -> int:
    r = chat.chat.completions.create(model=VLM, max_tokens=2, messages=[{"role": "user", "content": content}])
    return r.usage.prompt_tokens


@pytest.fixture(scope="module")
def per_image(chat):
    """(prompt tokens of the question alone, tokens one image adds)."""
    text = prompt_tokens(chat, [{"type": "text", "text": ASK}])
    one = prompt_tokens(chat, [{"type": "text", "text": ASK}, image(data_url(png("red")))])
    return text, one - text


def test_an_image_reaches_the_model_as_its_patches(per_image):
    _, added = per_image
    # 64 pixels in patches of 8, pixel-shuffled 2x2: 16 image tokens, plus the tags around them
    assert 16 <= added <= 24, added


def test_images_by_data_url_and_by_http_url(chat, per_image, media_url):
    text, added = per_image
    two = [{"type": "text", "text": ASK}, image(data_url(png("red"))), image(f"{media_url}/red.png")]
    assert prompt_tokens(chat, two) == text + 2 * added
    jpeg = io.BytesIO()
    Image.new("RGB", (300, 90), "blue").save(jpeg, "JPEG")  # resized to the model's 64 pixels
    assert prompt_tokens(chat, [{"type": "text", "text": ASK}, image(data_url(jpeg.getvalue(), "image/jpeg"))]) == \
        text + added
    r = chat.chat.completions.create(model=VLM, max_tokens=4, stream=True, stream_options={"include_usage": True},
                                     messages=[{"role": "user", "content": two}])
    usage = [c.usage for c in r if c.usage is not None]
    assert usage[-1].prompt_tokens == text + 2 * added


def bad(chat, content) -> dict:
    with pytest.raises(openai.BadRequestError) as e:
        chat.chat.completions.create(model=VLM, max_tokens=2, messages=[{"role": "user", "content": content}])
    return e.value.body


def test_more_images_than_limit_mm_per_prompt(chat):
    err = bad(chat, [{"type": "text", "text": ASK}] + [image(data_url(png(c))) for c in ("red", "green", "blue")])
    assert "2" in err["message"] and "image" in err["message"], err


@pytest.mark.parametrize("which", ["broken", "oversized", "http_broken", "http_missing"])
def test_a_bad_image_is_a_400_naming_its_part(chat, media_url, which):
    url = {"broken": "data:image/png;base64," + base64.b64encode(b"not a picture").decode(),
           "oversized": data_url(png("red", (400, 400))),  # 160,000 pixels over VLLM_MAX_IMAGE_PIXELS
           "http_broken": f"{media_url}/broken.png", "http_missing": f"{media_url}/nowhere.png"}[which]
    err = bad(chat, [{"type": "text", "text": ASK}, image(data_url(png("red"))), image(url)])
    assert err["param"] == "messages[0].content[2]", err


def test_responses_input_image(chat, per_image):
    text, added = per_image
    r = chat.responses.create(model=VLM, max_output_tokens=2, input=[{"role": "user", "content": [
        {"type": "input_text", "text": ASK}, {"type": "input_image", "image_url": data_url(png("red"))}]}])
    assert r.usage.input_tokens == text + added


def test_anthropic_image_block(vlm, per_image):
    text, added = per_image
    claude = anthropic.Anthropic(base_url=vlm[0], api_key="unused", max_retries=0, timeout=120)
    source = {"type": "base64", "media_type": "image/png", "data": base64.b64encode(png("red")).decode()}
    m = claude.messages.create(model=VLM, max_tokens=2, messages=[{"role": "user", "content": [
        {"type": "text", "text": ASK}, {"type": "image", "source": source}]}])
    assert m.usage.input_tokens == text + added
    with pytest.raises(anthropic.BadRequestError) as e:
        claude.messages.create(model=VLM, max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "text", "text": ASK}, {"type": "image", "source": {**source, "data": "bm90IGEgcGljdHVyZQ=="}}]}])
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "invalid_request_error"


def test_runpod_job_with_an_image(vlm, per_image):
    _, queue = vlm
    text, added = per_image
    content = [{"type": "text", "text": ASK}, image(data_url(png("red")))]
    _, result = queue.run({"openai_route": "/v1/chat/completions", "openai_input": {
        "model": VLM, "max_tokens": 2, "messages": [{"role": "user", "content": content}]}})
    assert result["output"][0]["usage"]["prompt_tokens"] == text + added, result
    _, standard = queue.run({"messages": [{"role": "user", "content": content}], "sampling_params": {"max_tokens": 2}})
    assert standard["output"][0]["usage"]["input"] == text + added, standard



# ---------------------------------------------------------------- audio


def wav(seconds: float, rate: int = 16000) -> str:
    """A tone, as base64 WAV."""
    t = np.arange(int(seconds * rate)) / rate
    buf = io.BytesIO()
    soundfile.write(buf, 0.3 * np.sin(2 * np.pi * 440 * t), rate, format="WAV")
    return base64.b64encode(buf.getvalue()).decode()


def clip(data: str) -> dict:
    return {"type": "input_audio", "input_audio": {"data": data, "format": "wav"}}


@pytest.fixture(scope="module")
def audio_chat(tmp_path_factory, run_dir):
    folder = tiny_model.build_audio_lm(tmp_path_factory.mktemp("tiny-audio"))
    endpoint = f"ipc://{run_dir}/engine-audio"
    engine = Proc("engine-audio", ["vllm_gateway.engine", "--endpoint", endpoint],
                  child_env(MODEL_NAME=str(folder), LOAD_FORMAT="dummy", SERVED_MODEL_NAME=ALM), run_dir,
                  own_group=True)
    port = free_port()
    gateway = Proc("gateway-audio", ["vllm_gateway.gateway", "http", "--port", str(port), "--engine-endpoints",
                                     endpoint], child_env(), run_dir)
    try:
        wait_healthy(f"http://127.0.0.1:{port}", [engine, gateway], ENGINE_START_TIMEOUT_S)
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
    finally:
        gateway.stop()
        engine.stop()


def audio_tokens(chat, content) -> int:
    r = chat.chat.completions.create(model=ALM, max_tokens=2, messages=[{"role": "user", "content": content}])
    return r.usage.prompt_tokens


def test_audio_clips_reach_the_model(audio_chat):
    text = audio_tokens(audio_chat, [{"type": "text", "text": ASK}])
    one = audio_tokens(audio_chat, [{"type": "text", "text": ASK}, clip(wav(1.0))])
    two = audio_tokens(audio_chat, [{"type": "text", "text": ASK}, clip(wav(2.0))])
    assert two - one == 25  # Whisper's frames, halved twice: a token per 40 ms
    assert one - text > 25  # and the audio tags around them
    # the same second as an audio_url data URL, and at 8 kHz (resampled to the model's 16 kHz)
    url = {"type": "audio_url", "audio_url": {"url": "data:audio/wav;base64," + wav(1.0)}}
    assert audio_tokens(audio_chat, [{"type": "text", "text": ASK}, url]) == one
    assert audio_tokens(audio_chat, [{"type": "text", "text": ASK}, clip(wav(1.0, rate=8000))]) == one


def test_a_broken_clip_is_a_400_naming_its_part(audio_chat):
    with pytest.raises(openai.BadRequestError) as e:
        audio_chat.chat.completions.create(model=ALM, max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "text", "text": ASK}, clip(base64.b64encode(b"not a sound").decode())]}])
    assert e.value.body["param"] == "messages[0].content[1]", e.value.body
