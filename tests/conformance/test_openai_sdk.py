"""imagegate against the official OpenAI Python SDK.

A session fixture starts the fake upstream (`fake-openai`) and `imagegate serve` pointed at it,
then each test uses the unmodified `openai` client the way a user would and checks what the user
sees. Run with `tests/conformance/run.sh`, or by hand:

    cargo build -p imagegate -p fake-openai -p engine --bins --example tiny_checkpoint
    python -m pytest -q tests/conformance

`IMAGEGATE_BIN_DIR` overrides where the two binaries are looked up (default: the cargo target
directory's `debug/`).
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import select
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import openai
import pytest
from openai import OpenAI
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
GATEWAY_KEY = "sk-conformance-test"
STARTUP_TIMEOUT_S = 30.0


def bin_dir() -> Path:
    if os.environ.get("IMAGEGATE_BIN_DIR"):
        return Path(os.environ["IMAGEGATE_BIN_DIR"])
    target = Path(os.environ.get("CARGO_TARGET_DIR") or REPO / "target")
    if not target.is_absolute():
        target = REPO / target
    return target / "debug"


def binary(name: str) -> Path:
    path = bin_dir() / name
    if not path.is_file():
        pytest.fail(
            f"{path} not found: run `cargo build -p imagegate -p fake-openai --bins` "
            f"(or set IMAGEGATE_BIN_DIR to the folder holding both binaries)",
            pytrace=False,
        )
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_log(f) -> str:
    f.flush()
    f.seek(0)
    return f.read().decode("utf-8", "replace")[-8000:]


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class Servers:
    gateway_url: str  # http://127.0.0.1:PORT (no /v1)
    fake_url: str  # http://127.0.0.1:PORT (no /v1)


# The models OpenAI shut down (gpt-image-1-mini and gpt-image-1.5 on 2026-12-01, gpt-image-1 on
# 2026-10-23, DALL-E on 2026-05-12) are served here by a compatible gateway that still has them (the
# fake), named in the config; the zero-config `openai` upstream (OPENAI_API_KEY) serves the live ones.
COMPAT_CONFIG = """
[providers.compat]
base_url = "{fake}/v1"
api_key_env = "OPENAI_API_KEY"
models = ["gpt-image-1-mini", "gpt-image-1", "gpt-image-1.5", "dall-e-3", "dall-e-2"]
"""


@contextlib.contextmanager
def launch(config: str, fake_args: tuple[str, ...] = (), local_model: bool = False):
    """The fake upstream and `imagegate serve` in front of it with `config` (`{fake}` is the fake's URL,
    `{model}` a tiny local model's directory when `local_model`); zero-config OPENAI_API_KEY too."""
    procs: list[subprocess.Popen] = []
    logs = []
    # imagegate's database (keys, budgets, ledger) in a directory of its own, not the user's data dir.
    data_dir = tempfile.mkdtemp(prefix="imagegate-conformance-")
    try:
        # 1. The fake upstream: it prints `listening on http://ADDR` once bound.
        fake_err = tempfile.TemporaryFile()
        logs.append(fake_err)
        fake = subprocess.Popen(
            [str(binary("fake-openai")), "--listen", "127.0.0.1:0", "--api-key", "upstream-secret", *fake_args],
            stdout=subprocess.PIPE,
            stderr=fake_err,
        )
        procs.append(fake)
        ready, _, _ = select.select([fake.stdout], [], [], 10)
        line = fake.stdout.readline().decode().strip() if ready else ""
        if not line.startswith("listening on http://"):
            pytest.fail(
                f"fake-openai did not announce its address (got {line!r}); stderr:\n{read_log(fake_err)}",
                pytrace=False,
            )
        fake_url = line.removeprefix("listening on ")

        # 2. imagegate, pointed at the fake.
        model_dir = Path(data_dir) / "tiny-model"
        if local_model:
            subprocess.run([str(tiny_checkpoint()), str(model_dir)], check=True)
        config_path = Path(data_dir) / "imagegate.toml"
        config_path.write_text(config.replace("{fake}", fake_url).replace("{model}", str(model_dir)))
        port = free_port()
        gw_log = tempfile.TemporaryFile()
        logs.append(gw_log)
        # No stray IMAGEGATE_* settings (a config file, other keys) from the caller.
        env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEGATE_")}
        env.update(
            OPENAI_API_KEY="upstream-secret",
            OPENAI_BASE_URL=f"{fake_url}/v1",
            IMAGEGATE_API_KEYS=GATEWAY_KEY,
            IMAGEGATE_DATA_DIR=data_dir,
        )
        gateway = subprocess.Popen(
            [str(binary("imagegate")), "serve", "--listen", f"127.0.0.1:{port}", "--config", str(config_path)],
            stdout=gw_log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=tempfile.gettempdir(),
        )
        procs.append(gateway)
        gateway_url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        last = "no answer yet"
        while True:
            if gateway.poll() is not None:
                pytest.fail(
                    f"imagegate serve exited with status {gateway.returncode} before /health answered; "
                    f"output:\n{read_log(gw_log)}",
                    pytrace=False,
                )
            try:
                with urllib.request.urlopen(f"{gateway_url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
                    last = f"status {resp.status}"
            except urllib.error.HTTPError as e:
                last = f"status {e.code}"
            except OSError as e:
                last = repr(e)
            if time.monotonic() > deadline:
                pytest.fail(
                    f"imagegate did not answer GET {gateway_url}/health with 200 within "
                    f"{STARTUP_TIMEOUT_S:.0f}s (last: {last}); output:\n{read_log(gw_log)}",
                    pytrace=False,
                )
            time.sleep(0.1)

        yield Servers(gateway_url=gateway_url, fake_url=fake_url)
    finally:
        for p in reversed(procs):
            stop(p)
        for f in logs:
            f.close()
        shutil.rmtree(data_dir, ignore_errors=True)


def tiny_checkpoint() -> Path:
    """The engine's example that writes a tiny random-weight model (run.sh builds it)."""
    for path in (bin_dir() / "examples" / "tiny_checkpoint", bin_dir() / "tiny_checkpoint"):
        if path.is_file():
            return path
    pytest.fail(
        f"tiny_checkpoint not found under {bin_dir()}: run `cargo build -p imagegate -p fake-openai -p engine --bins --example tiny_checkpoint`",
        pytrace=False,
    )


@pytest.fixture(scope="session")
def servers():
    with launch(COMPAT_CONFIG) as s:
        yield s


@pytest.fixture
def client(servers) -> OpenAI:
    return OpenAI(api_key=GATEWAY_KEY, base_url=f"{servers.gateway_url}/v1", timeout=60)


# ---------------------------------------------------------------------------------------------
# helpers


def png_bytes(w: int, h: int, mode: str = "RGB", color=(200, 80, 40)) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (w, h), color).save(buf, format="PNG")
    return buf.getvalue()


def mask_bytes(w: int, h: int) -> bytes:
    """RGBA mask: transparent (edit here) left half, opaque right half."""
    img = Image.new("RGBA", (w, h), (0, 0, 0, 255))
    img.paste((0, 0, 0, 0), (0, 0, w // 2, h))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def decode(b64: str | None) -> Image.Image:
    assert b64, "expected b64_json image data"
    img = Image.open(io.BytesIO(base64.b64decode(b64)))
    img.load()
    return img


# ---------------------------------------------------------------------------------------------
# 1-2. generations


def test_generate_png(client):
    r = client.images.generate(model="gpt-image-1-mini", prompt="a cute baby sea otter", size="1024x1024")
    assert len(r.data) == 1
    img = decode(r.data[0].b64_json)
    assert img.format == "PNG"
    assert img.size == (1024, 1024)
    assert r.size == "1024x1024"
    for field in ("quality", "background", "output_format"):
        value = getattr(r, field)
        assert value, f"{field} missing"
        assert value != "auto", f"{field} not resolved"
    assert r.output_format == "png"
    assert r.usage is not None
    assert r.usage.output_tokens > 0
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens


def test_generate_jpeg(client):
    r = client.images.generate(
        model="gpt-image-1-mini",
        prompt="a lighthouse at dusk",
        size="1024x1024",
        output_format="jpeg",
        output_compression=50,
    )
    raw = base64.b64decode(r.data[0].b64_json)
    assert raw[:3] == b"\xff\xd8\xff", "not a JPEG"
    img = decode(r.data[0].b64_json)
    assert img.format == "JPEG"
    assert img.size == (1024, 1024)
    assert r.output_format == "jpeg"


# ---------------------------------------------------------------------------------------------
# 3. edits


def test_edit_two_images_and_mask(client):
    first = png_bytes(256, 256)
    second = png_bytes(128, 96, color=(20, 120, 220))
    r = client.images.edit(
        model="gpt-image-1",
        image=[("a.png", first, "image/png"), ("b.png", second, "image/png")],
        mask=("mask.png", mask_bytes(256, 256), "image/png"),
        prompt="put both objects on a wooden table",
    )
    assert len(r.data) == 1
    img = decode(r.data[0].b64_json)
    assert img.width > 0 and img.height > 0
    assert r.usage is not None
    assert r.usage.input_tokens_details.image_tokens > 0


# ---------------------------------------------------------------------------------------------
# 4. streaming


def test_generate_stream(client):
    stream = client.images.generate(
        model="gpt-image-1-mini",
        prompt="a paper boat on a pond",
        size="1024x1024",
        stream=True,
        partial_images=2,
    )
    events = list(stream)
    assert [e.type for e in events] == [
        "image_generation.partial_image",
        "image_generation.partial_image",
        "image_generation.completed",
    ]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    for e in events[:2]:
        decode(e.b64_json)
    done = events[-1]
    assert decode(done.b64_json).size == (1024, 1024)
    assert done.size == "1024x1024"
    assert done.usage is not None
    assert done.usage.output_tokens > 0


def test_edit_stream(client):
    stream = client.images.edit(
        model="gpt-image-1",
        image=("a.png", png_bytes(256, 256), "image/png"),
        prompt="make it night",
        stream=True,
        partial_images=1,
    )
    events = list(stream)
    assert [e.type for e in events] == ["image_edit.partial_image", "image_edit.completed"]
    assert events[0].partial_image_index == 0
    decode(events[0].b64_json)
    decode(events[1].b64_json)
    assert events[1].usage is not None
    assert events[1].usage.output_tokens > 0


# ---------------------------------------------------------------------------------------------
# 5. errors


def test_bad_size_is_400_invalid_value(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(model="gpt-image-1-mini", prompt="p", size="1254x836")
    err = info.value
    assert err.status_code == 400
    assert isinstance(err.body, dict), err.body
    assert err.body.get("param") == "size"
    assert err.body.get("code") == "invalid_value"
    assert err.param == "size"
    assert err.code == "invalid_value"


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.images.generate(model="no-such-model", prompt="p")
    assert info.value.status_code == 404


def test_wrong_api_key_is_401(servers):
    bad = OpenAI(api_key="sk-wrong-key", base_url=f"{servers.gateway_url}/v1", timeout=60)
    with pytest.raises(openai.AuthenticationError) as info:
        bad.images.generate(model="gpt-image-1-mini", prompt="p")
    assert info.value.status_code == 401


def test_upstream_moderation_error_passes_through(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(model="gpt-image-1-mini", prompt="something unsafe [fault:400]")
    err = info.value
    assert err.status_code == 400
    assert isinstance(err.body, dict), err.body
    assert err.body.get("code") == "moderation_blocked"
    assert err.body.get("param") == "prompt"


# ---------------------------------------------------------------------------------------------
# 6. dall-e-3


def test_dalle3_b64_and_revised_prompt(client):
    r = client.images.generate(
        model="dall-e-3",
        prompt="an astronaut riding a horse",
        size="1024x1024",
        response_format="b64_json",
    )
    assert len(r.data) == 1
    img = decode(r.data[0].b64_json)
    assert img.size == (1024, 1024)
    assert r.data[0].revised_prompt
    assert "an astronaut riding a horse" in r.data[0].revised_prompt


def fetch(url: str) -> Image.Image:
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["content-type"] == "image/png"
        img = Image.open(io.BytesIO(resp.read()))
    img.load()
    return img


def test_dalle_answers_with_urls_that_serve_the_images(client):
    # DALL-E's default response_format is url: code written for it reads `.url`.
    r = client.images.generate(model="dall-e-3", prompt="an astronaut riding a horse", size="1024x1024")
    assert r.data[0].b64_json is None
    assert fetch(r.data[0].url).size == (1024, 1024)


def test_gpt_image_models_answer_with_urls_when_asked(client):
    # OpenAI refuses this; imagegate stores the images and links them.
    r = client.images.generate(model="gpt-image-1-mini", prompt="an otter", size="1024x1024", response_format="url")
    assert fetch(r.data[0].url).size == (1024, 1024)


def test_create_variation(client):
    r = client.images.create_variation(image=("otter.png", png_bytes(64, 64), "image/png"), n=2, size="256x256")
    assert len(r.data) == 2
    for d in r.data:
        assert fetch(d.url).size == (256, 256)
    r = client.images.create_variation(
        image=("otter.png", png_bytes(64, 64), "image/png"), size="512x512", response_format="b64_json"
    )
    assert decode(r.data[0].b64_json).size == (512, 512)


def test_expired_or_unknown_image_urls_are_404_in_openais_envelope(servers):
    try:
        urllib.request.urlopen(f"{servers.gateway_url}/v1/images/img_unknown/content", timeout=10)
        raise AssertionError("expected a 404")
    except urllib.error.HTTPError as e:
        with e:
            assert e.code == 404
            assert json.loads(e.read())["error"]["code"] == "image_not_found"


# ---------------------------------------------------------------------------------------------
# 7. a transient upstream failure is invisible to the user (gateway and/or SDK retries)


def test_transient_upstream_500_is_retried(client):
    r = client.images.generate(
        model="gpt-image-1-mini", prompt=f"a kite [fault:500-once] {time.time_ns()}", size="1024x1024"
    )
    assert decode(r.data[0].b64_json).size == (1024, 1024)


# ---------------------------------------------------------------------------------------------
# 8. gpt-image-2, and code that still names a shut-down model


def test_gpt_image_2_takes_any_size_within_its_rule(client):
    r = client.images.generate(model="gpt-image-2", prompt="a wide harbour", size="2048x1152", quality="low")
    assert decode(r.data[0].b64_json).size == (2048, 1152)
    assert r.usage.output_tokens == 157  # OpenAI's calculator formula, as the fake computes it
    with pytest.raises(openai.BadRequestError) as info:
        client.images.generate(model="gpt-image-2", prompt="p", size="1000x1000")
    assert info.value.param == "size"
    assert "multiples of 16" in info.value.message


def test_models_carry_shutdown_dates(client):
    assert client.models.retrieve("gpt-image-1-mini").shutdown_date == "2026-12-01"
    models = {m.id: m for m in client.models.list()}
    assert models["gpt-image-2"].shutdown_date is None
    assert models["dall-e-3"].shutdown_date == "2026-05-12"


REPLACED_BY_GPT_IMAGE_2 = """
[replacements]
"gpt-image-1-mini" = "gpt-image-2"
"""

LOCAL_ONLY = """
[models.tiny]
path = "{model}"
profile = "turbo"
"""


@pytest.mark.parametrize(
    "config, served_by",
    [(REPLACED_BY_GPT_IMAGE_2, "gpt-image-2@openai"), (LOCAL_ONLY, "tiny@local")],
    ids=["replaced-by-gpt-image-2", "only-a-local-model"],
)
def test_code_naming_gpt_image_1_mini_keeps_working(config, served_by):
    # OpenAI answers gpt-image-1-mini as it does since its shutdown; the code below is unchanged.
    with launch(config, fake_args=("--shut-down", "gpt-image-1-mini"), local_model="{model}" in config) as s:
        client = OpenAI(api_key=GATEWAY_KEY, base_url=f"{s.gateway_url}/v1", timeout=120)
        raw = client.images.with_raw_response.generate(model="gpt-image-1-mini", prompt="a cute baby sea otter")
        assert raw.headers["x-imagegate-served-by"] == served_by
        r = raw.parse()
        assert decode(r.data[0].b64_json).width > 0
        assert client.models.retrieve("gpt-image-1-mini").shutdown_date == "2026-12-01"


# A Z-Image checkpoint (the tiny one the parity tests check against diffusers) serving the shut-down
# gpt-image-1-mini: code written for it keeps working, on the model family that replaces it.
ZIMAGE_TINY = Path(__file__).resolve().parents[1] / "parity" / "zimage-tiny"

ZIMAGE_AS_MINI = f"""
[models.z-image]
path = "{ZIMAGE_TINY}"

[replacements]
"gpt-image-1-mini" = "z-image"
"""


def test_a_z_image_model_generates_and_edits_as_gpt_image_1_mini():
    with launch(ZIMAGE_AS_MINI, fake_args=("--shut-down", "gpt-image-1-mini")) as s:
        client = OpenAI(api_key=GATEWAY_KEY, base_url=f"{s.gateway_url}/v1", timeout=120)
        raw = client.images.with_raw_response.generate(
            model="gpt-image-1-mini", prompt="a cute baby sea otter", size="128x96", n=2, quality="low",
            extra_body={"seed": 7},
        )
        assert raw.headers["x-imagegate-served-by"] == "z-image@local"
        r = raw.parse()
        assert [decode(d.b64_json).size for d in r.data] == [(128, 96), (128, 96)]
        assert r.data[0].b64_json != r.data[1].b64_json
        # The same request and seed give the same images (the pixels: each file's signed manifest is
        # its own).
        again = client.images.generate(
            model="gpt-image-1-mini", prompt="a cute baby sea otter", size="128x96", n=2, quality="low",
            extra_body={"seed": 7},
        )
        assert [decode(d.b64_json).tobytes() for d in again.data] == [decode(d.b64_json).tobytes() for d in r.data]

        # An edit with a mask: outside the mask (opaque) the input is kept exactly.
        source = png_bytes(128, 96)
        edited = client.images.edit(
            model="gpt-image-1-mini", image=("a.png", source, "image/png"),
            mask=("mask.png", mask_bytes(128, 96), "image/png"), prompt="a red boat", size="128x96",
        )
        out = decode(edited.data[0].b64_json).convert("RGB")
        assert out.size == (128, 96)
        assert out.getpixel((120, 50)) == (200, 80, 40)

        # Streamed, with partial images from intermediate steps.
        events = list(client.images.generate(
            model="gpt-image-1-mini", prompt="a paper boat", size="96x96", stream=True, partial_images=1,
        ))
        assert [e.type for e in events] == ["image_generation.partial_image", "image_generation.completed"]
        assert decode(events[-1].b64_json).size == (96, 96)

        # A size the model cannot make is the OpenAI-shaped 400 naming the field.
        with pytest.raises(openai.BadRequestError) as e:
            client.images.generate(model="gpt-image-1-mini", prompt="p", size="130x96")
        assert e.value.body["param"] == "size"


# ---------------------------------------------------------------------------------------------
# Content Credentials: every local image carries a C2PA manifest, read here by the C2PA project's own
# Python reader (c2pa-python, its own build of the SDK), not imagegate's code.


def c2pa_manifest(data: bytes, mime: str) -> tuple[dict, str, dict]:
    """The active manifest, the validation state, and the whole report of an image."""
    import c2pa

    with c2pa.Reader(mime, io.BytesIO(data)) as reader:
        report = json.loads(reader.json())
        return reader.get_active_manifest(), reader.get_validation_state(), report


def failures(report: dict) -> list[str]:
    active = report.get("validation_results", {}).get("activeManifest", {})
    return [f["code"] for f in active.get("failure", [])]


def assertion(manifest: dict, label: str) -> dict:
    [found] = [a["data"] for a in manifest["assertions"] if a["label"] == label]
    return found


def actions(manifest: dict) -> list[dict]:
    return [a for a in manifest["assertions"] if a["label"].startswith("c2pa.actions")][0]["data"]["actions"]


def check_credentials(data: bytes, mime: str, model: str) -> dict:
    manifest, state, report = c2pa_manifest(data, mime)
    # Valid, not Trusted: the server's own identity is on no trust list; the only failure is that.
    assert state == "Valid", (state, failures(report))
    assert failures(report) == ["signingCredential.untrusted"], failures(report)
    assert manifest["claim_generator_info"][0]["name"] == "imagegate"
    assert manifest["signature_info"]["common_name"] == "imagegate local signer"
    generation = assertion(manifest, "org.imagegate.generation")
    assert generation["model"] == model
    assert len(generation["checkpoint"]["files_sha256"]) == 64
    assert "prompt" not in generation
    return manifest


def test_local_images_carry_content_credentials_the_c2pa_reader_validates():
    config = '[models.tiny]\npath = "{model}"\nprofile = "turbo"\n[aliases]\n"gpt-image-1-mini" = "tiny"\n'
    with launch(config, local_model=True) as s:
        client = OpenAI(api_key=GATEWAY_KEY, base_url=f"{s.gateway_url}/v1", timeout=120)
        for fmt, mime in (("png", "image/png"), ("jpeg", "image/jpeg"), ("webp", "image/webp")):
            r = client.images.generate(model="gpt-image-1-mini", prompt="an otter", size="64x64", output_format=fmt)
            data = base64.b64decode(r.data[0].b64_json)
            manifest = check_credentials(data, mime, "tiny")
            [created] = actions(manifest)
            assert created["action"] == "c2pa.created"
            assert created["digitalSourceType"].endswith("/trainedAlgorithmicMedia")

            # One flipped byte of the image data: the reader finds the hash no longer matches.
            tampered = bytearray(data)
            marker = {"png": b"IDAT", "jpeg": b"\xff\xda", "webp": b"VP8"}[fmt]
            tampered[data.rindex(marker) + 40] ^= 1
            _, state, report = c2pa_manifest(bytes(tampered), mime)
            assert state == "Invalid", state
            assert "assertion.dataHash.mismatch" in failures(report), failures(report)

        # An edit with a mask: the input is the parent, the mask an input, the result a composite.
        edited = client.images.edit(
            model="tiny", image=("a.png", png_bytes(64, 64), "image/png"),
            mask=("mask.png", mask_bytes(64, 64), "image/png"), prompt="a red boat", size="64x64",
        )
        manifest = check_credentials(base64.b64decode(edited.data[0].b64_json), "image/png", "tiny")
        assert [a["action"] for a in actions(manifest)] == ["c2pa.opened", "c2pa.edited"]
        assert actions(manifest)[1]["digitalSourceType"].endswith("/compositeWithTrainedAlgorithmicMedia")
        assert [i["relationship"] for i in manifest["ingredients"]] == ["parentOf", "inputTo"]

        # A stream: the partial image and the completed one are both signed.
        events = list(client.images.generate(
            model="tiny", prompt="a paper boat", size="64x64", stream=True, partial_images=1, extra_body={"steps": 2},
        ))
        assert [e.type for e in events] == ["image_generation.partial_image", "image_generation.completed"]
        partial = check_credentials(base64.b64decode(events[0].b64_json), "image/png", "tiny")
        assert assertion(partial, "org.imagegate.generation")["partial_image"] == 0
        check_credentials(base64.b64decode(events[1].b64_json), "image/png", "tiny")


def test_the_cli_verify_and_the_c2pa_reader_agree(tmp_path):
    """The acceptance: `imagegate generate ... --out a.png && imagegate verify a.png`, read by both."""
    model = tmp_path / "tiny-model"
    subprocess.run([str(tiny_checkpoint()), str(model)], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("IMAGEGATE_", "OPENAI_"))}
    common = ["--data-dir", str(tmp_path / "data")]
    subprocess.run(
        [str(binary("imagegate")), "generate", "an otter", "--model", str(model), "--size", "64x64",
         "--steps", "1", "--out", str(tmp_path / "a.png"), *common],
        check=True, env=env, cwd=tmp_path,
    )
    shown = subprocess.run(
        [str(binary("imagegate")), "verify", str(tmp_path / "a.png")], check=True, env=env, capture_output=True,
        text=True,
    ).stdout
    assert "model:       tiny-model" in shown and "validation:  valid" in shown, shown
    manifest, state, _ = c2pa_manifest((tmp_path / "a.png").read_bytes(), "image/png")
    assert state == "Valid"
    assert assertion(manifest, "org.imagegate.generation")["model"] == "tiny-model"
    assert f"signed by:   {manifest['signature_info']['common_name']}" in shown


# ---------------------------------------------------------------------------------------------
# The flex tier, the Files and Batch APIs, /metrics


def batch_file(lines: list[dict]) -> bytes:
    return "".join(json.dumps(line) + "\n" for line in lines).encode()


def generation_line(i: int, body: dict) -> dict:
    return {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/images/generations", "body": body}


def run_batch(client: OpenAI, lines: list[dict], timeout_s: float = 120):
    uploaded = client.files.create(file=("batch.jsonl", batch_file(lines)), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/images/generations", completion_window="24h"
    )
    deadline = time.monotonic() + timeout_s
    while batch.status not in ("completed", "failed", "expired", "cancelled"):
        assert time.monotonic() < deadline, f"batch {batch.id} still {batch.status}"
        time.sleep(0.2)
        batch = client.batches.retrieve(batch.id)
    return batch


def check_batch_output(client: OpenAI, batch, n: int) -> None:
    assert batch.status == "completed", batch
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (n, n, 0)
    out = [json.loads(line) for line in client.files.content(batch.output_file_id).text.splitlines()]
    assert [o["custom_id"] for o in out] == [f"req-{i}" for i in range(n)]
    for o in out:
        assert o["error"] is None and o["response"]["status_code"] == 200
        assert decode(o["response"]["body"]["data"][0]["b64_json"]).width > 0
        assert o["response"]["body"]["imagegate"]["service_tier"] == "batch"


def test_batch_of_20_generations(client):
    lines = [
        generation_line(i, {"model": "gpt-image-1-mini", "prompt": f"an otter, take {i}", "size": "1024x1024", "quality": "low"})
        for i in range(20)
    ]
    check_batch_output(client, run_batch(client, lines), 20)
    listed = client.batches.list(limit=5)
    assert listed.data and listed.data[0].object == "batch"


def test_batch_of_20_on_a_local_model():
    config = '[models.tiny]\npath = "{model}"\nprofile = "turbo"\n'
    with launch(config, local_model=True) as s:
        client = OpenAI(api_key=GATEWAY_KEY, base_url=f"{s.gateway_url}/v1", timeout=120)
        lines = [
            generation_line(i, {"model": "tiny", "prompt": f"an otter, take {i}", "size": "64x64", "seed": i})
            for i in range(20)
        ]
        check_batch_output(client, run_batch(client, lines), 20)


def test_a_batch_with_one_bad_line_fails_whole(client):
    lines = [
        generation_line(0, {"model": "gpt-image-1-mini", "prompt": "fine"}),
        generation_line(1, {"model": "gpt-image-1-mini", "prompt": "bad size", "size": "1000x1000"}),
    ]
    batch = run_batch(client, lines)
    assert batch.status == "failed"
    assert batch.output_file_id is None
    [error] = batch.errors.data
    assert (error.line, error.code, error.param) == (2, "invalid_value", "body.size")


def test_another_key_cannot_see_a_batch(client, servers):
    uploaded = client.files.create(file=("batch.jsonl", batch_file([generation_line(0, {"prompt": "mine"})])), purpose="batch")
    stranger = OpenAI(api_key="sk-not-a-key-here", base_url=f"{servers.gateway_url}/v1", timeout=30)
    with pytest.raises(openai.AuthenticationError):
        stranger.files.retrieve(uploaded.id)


def test_flex_is_half_price_and_says_so(client):
    default = client.images.with_raw_response.generate(model="gpt-image-1-mini", prompt="a flexible otter", quality="low")
    flex = client.images.with_raw_response.generate(
        model="gpt-image-1-mini", prompt="a flexible otter", quality="low", extra_body={"service_tier": "flex"}
    )
    assert default.headers["x-imagegate-service-tier"] == "default"
    assert flex.headers["x-imagegate-service-tier"] == "flex"
    from decimal import Decimal

    assert Decimal(flex.headers["x-imagegate-cost-usd"]) * 2 == Decimal(default.headers["x-imagegate-cost-usd"])


def test_metrics_parse_as_openmetrics(client, servers):
    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    # (Families with no sample yet, such as refusals, are left out of the exposition.)
    client.images.generate(model="gpt-image-1-mini", prompt="counted", quality="low")
    with urllib.request.urlopen(f"{servers.gateway_url}/metrics", timeout=10) as resp:
        assert resp.headers["Content-Type"].startswith("application/openmetrics-text")
        text = resp.read().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in (
        "imagegate_requests",
        "imagegate_charged_nanodollars",
        "imagegate_queue_waiting",
        "imagegate_queue_running",
        "imagegate_queue_wait_seconds",
    ):
        assert name in families, sorted(families)
    served = [s for s in families["imagegate_requests"].samples if s.labels.get("status") == "succeeded"]
    assert served and all(s.labels["tier"] in ("default", "flex", "batch") for s in served)
    waiting = {(s.labels["provider"], s.labels["class"]) for s in families["imagegate_queue_waiting"].samples}
    assert ("compat", "background") in waiting
