"""The page's errors say what to do, and it reads well in the dark theme (headless Chromium): a blocked
camera says how to allow it, a page that cannot have a camera (plain http from another machine) says
so on load and how to fix it, and text and controls keep a WCAG AA contrast (4.5:1) on dark."""

from __future__ import annotations

from tests.test_app_webrtc import running  # noqa: F401 - the app fixture
from tests.test_browser import chromium, pytestmark  # noqa: F401

DENIED = ("navigator.mediaDevices.getUserMedia = "
          "() => Promise.reject(new DOMException('Permission denied', 'NotAllowedError'));")
#: what a browser gives a page served over plain http from another machine: no navigator.mediaDevices
INSECURE = "delete Navigator.prototype.mediaDevices;"

#: The WCAG contrast ratio of each element's text against what is behind it (the first opaque
#: background up the tree, with any translucent ones blended over it).
CONTRAST = """(selectors) => {
  const rgba = (text) => { const [r, g, b, a = 1] = text.match(/[\\d.]+/g).map(Number); return [r, g, b, a]; };
  const over = ([r, g, b, a], [R, G, B]) => [r * a + R * (1 - a), g * a + G * (1 - a), b * a + B * (1 - a)];
  const luminance = (rgb) => {
    const [r, g, b] = rgb.map((v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; });
    return 0.2126 * r + 0.7152 * g + 0.0722 * b;
  };
  const behind = (el) => {
    const layers = [];
    for (let e = el; e; e = e.parentElement) {
      const c = rgba(getComputedStyle(e).backgroundColor);
      if (c[3] > 0) layers.push(c);
      if (c[3] >= 1) break;
    }
    return layers.reverse().reduce((below, layer) => over(layer, below), [255, 255, 255]);
  };
  return Object.fromEntries(selectors.map((selector) => {
    const el = document.querySelector(selector);
    const bg = behind(el), fg = over(rgba(getComputedStyle(el).color), bg);
    const [hi, lo] = [luminance(fg), luminance(bg)].sort((a, b) => b - a);
    return [selector, Math.round((hi + 0.05) / (lo + 0.05) * 100) / 100];
  }));
}"""
READABLE = ("#diffcam-status", "#diffcam-stats", "#diffcam-camera", "#diffcam-start", "#diffcam-fullscreen",
            "#diffcam-title", "#diffcam-bar label")


async def test_errors_say_what_to_do_and_the_dark_theme_reads_well(running) -> None:  # noqa: F811
    async with chromium() as browser:
        dark = await browser.new_context()
        await dark.add_init_script(DENIED)
        page = await dark.new_page()
        await page.goto(f"{running.url}/?__theme=dark", wait_until="load", timeout=60_000)
        await page.wait_for_function("() => document.querySelectorAll('#diffcam-camera option').length >= 1",
                                     timeout=20_000)
        assert await page.evaluate("() => document.body.classList.contains('dark')"), "not the dark theme"
        assert min((await page.evaluate(CONTRAST, READABLE)).values()) >= 4.5, await page.evaluate(CONTRAST, READABLE)

        # a blocked camera: how to allow it, in a colour that still reads on dark
        await page.locator("#diffcam-start").click()
        await page.wait_for_function("() => document.getElementById('diffcam-status').dataset.kind === 'error'",
                                     timeout=20_000)
        message = await page.text_content("#diffcam-status")
        assert "address bar" in message and "allow the camera" in message, message
        assert (await page.evaluate(CONTRAST, ["#diffcam-status"]))["#diffcam-status"] >= 4.5
        assert await page.is_enabled("#diffcam-start") and not await page.is_enabled("#diffcam-stop")
        assert running.engine.snapshot()["sessions_active"] == 0

        # no camera API at all (http from another machine): said on load, with the fix
        insecure = await browser.new_context()
        await insecure.add_init_script(INSECURE)
        page = await insecure.new_page()
        await page.goto(running.url, wait_until="load", timeout=60_000)
        await page.wait_for_function("() => document.getElementById('diffcam-status')?.dataset.kind === 'error'",
                                     timeout=20_000)
        message = await page.text_content("#diffcam-status")
        assert "secure" in message and "--https" in message and "127.0.0.1" in message, message
        await page.locator("#diffcam-start").click()
        assert await page.text_content("#diffcam-status") == message, "Start says the same, not a TypeError"
