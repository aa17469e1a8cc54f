"""The page on a laptop screen (1366×768), in headless Chromium with a fake camera: the output and the
main controls fit together, the camera list is there before Start, switching the camera keeps the
stream, a refused value is shown beside its control, Stop resets the stats, and closing the tab
frees the slot at once."""

from __future__ import annotations

import re

from tests.test_app_webrtc import running  # noqa: F401 - the app fixture
from tests.test_browser import ARTIFACTS, chromium, pytestmark, until, wait_pictures, wait_status  # noqa: F401

LAPTOP = {"width": 1366, "height": 768}
IDLE_STATS = "output – fps · latency – · dropped – · skipped –"
#: what must be on screen together while streaming, without scrolling
MAIN = ("#diffcam-output", "#diffcam-start", "#diffcam-stop", "#diffcam-camera", "#diffcam-style input",
        "#diffcam-param-prompt textarea", "#diffcam-param-strength input[type=range]")
TRANSFORMS = ("() => ['diffcam-local', 'diffcam-output']"
              ".map((id) => getComputedStyle(document.getElementById(id)).transform)")
SEED_ERROR = "#diffcam-param-seed .diffcam-field-error"
STUN = {"urls": ["stun:127.0.0.1:9"], "username": "", "credential": ""}


async def test_the_page_fits_a_laptop_screen_switches_cameras_and_says_what_was_refused(running) -> None:  # noqa: F811
    async with chromium() as browser:
        page = await browser.new_page(viewport=LAPTOP)
        await page.goto(running.url, wait_until="load", timeout=60_000)
        # the camera list is filled before the first Start, with a name for every camera
        await page.wait_for_function("() => document.querySelectorAll('#diffcam-camera option').length >= 1",
                                     timeout=20_000)
        assert all(await page.eval_on_selector_all("#diffcam-camera option", "os => os.map((o) => o.textContent)"))

        await page.locator("#diffcam-start").click()
        await wait_status(page, "streaming", timeout=60_000)
        shown = await wait_pictures(page)
        await page.wait_for_function("() => /^output [0-9.]+ fps/.test(document.getElementById('diffcam-stats')"
                                     ".textContent)", timeout=20_000)
        await _assert_on_screen(page, MAIN)
        # once the camera is allowed, the list shows the cameras' own names
        names = await page.eval_on_selector_all("#diffcam-camera option", "os => os.map((o) => o.textContent)")
        assert names and not any(re.fullmatch(r"camera \d+", name) for name in names), names
        ARTIFACTS.mkdir(exist_ok=True)
        await page.screenshot(path=str(ARTIFACTS / "page-1366x768.png"))

        # a selfie view by default; the output follows the Mirror toggle
        assert await page.evaluate(TRANSFORMS) == ["matrix(-1, 0, 0, 1, 0, 0)"] * 2
        # one click shows only the output, full screen (still mirrored, the preview hidden)
        await page.locator("#diffcam-fullscreen").click()
        await page.wait_for_function("() => document.fullscreenElement?.id === 'diffcam-stage'", timeout=10_000)
        assert await page.is_hidden("#diffcam-local")
        assert (await page.evaluate(TRANSFORMS))[1] == "matrix(-1, 0, 0, 1, 0, 0)"
        await page.evaluate("() => document.exitFullscreen()")
        await page.locator("#diffcam-mirror").uncheck()
        assert await page.evaluate(TRANSFORMS) == ["none"] * 2

        # switching the camera while streaming replaces the sent track; the stream goes on
        await page.evaluate("() => { window.oldTrack = window.diffcam.state.sender.track; }")
        await page.evaluate("() => window.diffcam.switchCamera()")
        assert await page.evaluate("() => window.diffcam.state.sender.track !== window.oldTrack "
                                   "&& window.oldTrack.readyState === 'ended' "
                                   "&& window.diffcam.state.sender.track.readyState === 'live'")
        shown = await wait_pictures(page, after=shown["frames"] + 10, timeout=30_000)
        assert await page.text_content("#diffcam-status") == "streaming"

        # a refused value is shown beside its control; the stream goes on; a good value clears it
        seed = page.locator("#diffcam-param-seed input")
        await seed.fill("-5")
        await seed.press("Enter")
        await page.wait_for_selector(f"{SEED_ERROR}:not([hidden])", timeout=20_000)
        assert "seed" in await page.text_content(SEED_ERROR)
        assert await page.text_content("#diffcam-status") == "streaming"
        await seed.fill("3")
        await seed.press("Enter")
        await page.wait_for_selector(f"{SEED_ERROR}[hidden]", state="attached", timeout=20_000)
        await wait_pictures(page, after=shown["frames"] + 3, timeout=30_000)

        # Stop resets the stats
        await page.locator("#diffcam-stop").click()
        assert await page.text_content("#diffcam-stats") == IDLE_STATS
        assert await page.text_content("#diffcam-status") == "stopped"
        await until(lambda: running.engine.snapshot()["sessions_active"] == 0, 5.0, "Stop freed its session")


async def test_a_tab_closed_without_stop_frees_its_slot_at_once(running) -> None:  # noqa: F811
    async with chromium() as browser:
        # the page's beacon alone frees the slot: here the browser's connection is kept open
        page = await _streaming(await browser.new_page(), running)
        await page.evaluate("() => { RTCPeerConnection.prototype.close = () => {}; "
                            "window.dispatchEvent(new PageTransitionEvent('pagehide')); }")
        await until(lambda: running.engine.snapshot()["sessions_active"] == 0, 5.0, "the beacon freed its session")
        await page.close()
        # and a real tab, closed, gives its slot back long before the server's camera timeout would;
        # this one is told of a STUN server, which its peer connection uses
        page = await browser.new_page()
        await page.route("**/client-config", lambda route: route.fulfill(json={"ice_servers": [STUN]}))
        page = await _streaming(page, running)
        assert await page.evaluate("() => window.diffcam.state.pc.getConfiguration().iceServers") == [STUN]
        await page.close(run_before_unload=True)
        await until(lambda: running.engine.snapshot()["sessions_active"] == 0, 5.0,
                     "closing the tab freed its session")


async def _streaming(page, running):  # noqa: F811
    await page.goto(running.url, wait_until="load", timeout=60_000)
    await page.locator("#diffcam-start").click(timeout=30_000)
    await wait_status(page, "streaming", timeout=60_000)
    assert running.engine.snapshot()["sessions_active"] == 1
    return page


async def _assert_on_screen(page, selectors: tuple[str, ...]) -> None:
    for selector in selectors:
        box = await page.locator(selector).bounding_box()
        assert box is not None, f"{selector} is not shown"
        inside = box["x"] >= 0 and box["y"] >= 0 and box["x"] + box["width"] <= LAPTOP["width"] \
            and box["y"] + box["height"] <= LAPTOP["height"]
        assert inside, f"{selector} at {box} is not within the {LAPTOP} viewport"
