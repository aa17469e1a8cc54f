"""Listed streams in a real browser: an aiortc WHIP publisher (as OBS is one) streams; the page lists
it, plays it over WHEP and steers it; the player page (/view/<id>, an OBS Browser Source) plays it
and connects again by itself when the server drops it."""

from __future__ import annotations

import httpx

from tests.test_app_webrtc import running  # noqa: F401 - the app fixture
from tests.test_browser import ARTIFACTS, chromium, pytestmark, until, wait_pictures  # noqa: F401
from tests.test_whip import Publisher

PROMPT = "a neon city at night"
SEED_ERROR = "#diffcam-param-seed .diffcam-field-error"
#: the player shows the newest connection's video, and has hidden its status since frames came
PLAYING_AGAIN = """(old) => {
  const s = window.diffcamView.state, video = document.getElementById('video');
  const track = s.pc && s.pc.getReceivers()[0].track;
  return s.resource && s.resource !== old && video.srcObject && video.srcObject.getVideoTracks()[0] === track
    && document.getElementById('status').hidden;
}"""


async def test_the_page_steers_a_whip_stream_and_the_player_page_plays_it(running) -> None:  # noqa: F811
    publisher = Publisher()
    try:
        published = await publisher.publish(running.url)
        assert published.status_code == 201, published.text
        stream_id = published.headers["location"].rsplit("/", 1)[1]
        running.engine.sessions()[0].update(prompt="a stream of its own", seed=11)
        async with chromium() as browser:
            page = await browser.new_page(viewport={"width": 1366, "height": 768})
            await page.goto(running.url, wait_until="load", timeout=60_000)
            await page.wait_for_function("(id) => [...document.querySelectorAll('#diffcam-stream option')]"
                                         ".some((o) => o.value === id)", arg=stream_id, timeout=20_000)
            await page.select_option("#diffcam-stream", stream_id)
            shown = await wait_pictures(page)
            await page.wait_for_function("() => document.getElementById('diffcam-status').textContent"
                                         ".startsWith('watching')", timeout=20_000)
            view_url = await page.input_value("#diffcam-view-url")
            assert view_url == f"{running.url}/view/{stream_id}"

            # the controls show what the stream runs with (OBS's stream was given its own prompt and seed)
            session = running.engine.sessions()[0]
            assert await page.input_value("#diffcam-param-prompt textarea") == "a stream of its own"
            assert await page.input_value("#diffcam-param-seed input") == "11"

            # the controls steer the stream: its session takes the new prompt; a refused seed shows at the seed
            assert session.config.prompt != PROMPT
            await page.locator("#diffcam-param-prompt textarea").fill(PROMPT)
            await until(lambda: session.config.prompt == PROMPT, 10.0, "the stream took the page's prompt")
            seed = page.locator("#diffcam-param-seed input")
            await seed.fill("-5")
            await seed.press("Enter")
            await page.wait_for_selector(f"{SEED_ERROR}:not([hidden])", timeout=20_000)
            assert "seed" in await page.text_content(SEED_ERROR)
            assert (await page.text_content("#diffcam-status")).startswith("watching")
            await wait_pictures(page, after=shown["frames"] + 5, timeout=30_000)

            # the player page plays it, full window, its status hidden while playing
            player = await browser.new_page(viewport={"width": 640, "height": 360})
            await player.goto(view_url, wait_until="load", timeout=30_000)
            await wait_pictures(player, "video")
            await player.wait_for_selector("#status", state="hidden", timeout=10_000)
            ARTIFACTS.mkdir(exist_ok=True)
            await player.screenshot(path=str(ARTIFACTS / "view.png"))

            # the server drops this player: it connects again by itself and plays on
            resource = await player.evaluate("() => window.diffcamView.state.resource")
            async with httpx.AsyncClient(base_url=running.url, timeout=20) as http:
                assert (await http.delete(resource)).status_code == 200
            await player.wait_for_function(PLAYING_AGAIN, arg=resource, timeout=30_000)
            await wait_pictures(player, "video")
            async with httpx.AsyncClient(base_url=running.url, timeout=20) as http:
                listed = (await http.get("/streams")).json()["streams"]
            assert [s["viewers"] for s in listed if s["id"] == stream_id] == [2], "the page and the player, no more"
    finally:
        await publisher.pc.close()
