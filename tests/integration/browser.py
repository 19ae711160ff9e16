"""Headless Debian chromium for the web UI tests: start it, read its console, judge a
screenshot. Skips (with the reason) when chromium or chromium-driver is not installed;
scripts/test.sh installs both."""

from __future__ import annotations

import os
import shutil
import struct
import tempfile
import zlib

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def start_chromium(javascript: bool = True):
    if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
        pytest.skip("browser tests need Debian's chromium and chromium-driver "
                    "(scripts/test.sh installs them with apt-get)")
    os.environ.setdefault("SE_OFFLINE", "true")  # never let selenium fetch a driver
    from selenium import webdriver  # noqa: PLC0415
    from selenium.webdriver.chrome.service import Service  # noqa: PLC0415

    profile = tempfile.mkdtemp(prefix="silo-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1280,900",
                f"--user-data-dir={profile}"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    if not javascript:
        opts.add_experimental_option(
            "prefs", {"profile.managed_default_content_settings.javascript": 2})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)
    driver.set_page_load_timeout(60)
    driver.silo_profile = profile
    return driver


def stop_chromium(driver) -> None:
    try:
        driver.quit()
    finally:
        shutil.rmtree(driver.silo_profile, ignore_errors=True)


def console_errors(driver, allow: tuple[str, ...] = ()) -> list[str]:
    """SEVERE console entries since the last call, minus the `allow`ed substrings."""
    out = []
    for entry in driver.get_log("browser"):
        if entry.get("level") == "SEVERE" and not any(a in entry["message"] for a in allow):
            out.append(entry["message"])
    return out


def screenshot_colours(driver) -> int:
    """Distinct colours of a quarter-scale screenshot of the viewport (1 = blank)."""
    import base64  # noqa: PLC0415

    size = driver.get_window_size()
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "clip": {
        "x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 0.25}})
    return png_colours(base64.b64decode(shot["data"]))


def png_colours(png: bytes, limit: int = 64) -> int:
    """How many distinct pixel values a PNG has (up to `limit`): 1 means blank.

    Decodes just enough PNG (8-bit RGB/RGBA, all filter types) to count colours,
    without an imaging library."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width, height, channels = 8, b"", 0, 0, 0
    while pos < len(png):
        (n,) = struct.unpack(">I", png[pos:pos + 4])
        kind, body = png[pos + 4:pos + 8], png[pos + 8:pos + 8 + n]
        if kind == b"IHDR":
            width, height, depth, colour = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and colour in (2, 6), (depth, colour)
            channels = 3 if colour == 2 else 4
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    raw = zlib.decompress(idat)
    stride = width * channels
    prev = bytearray(stride)
    seen: set[bytes] = set()
    for y in range(height):
        f = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - channels] if i >= channels else 0
            b = prev[i]
            c = prev[i - channels] if i >= channels else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        for x in range(0, stride, channels):
            seen.add(bytes(line[x:x + channels]))
            if len(seen) >= limit:
                return len(seen)
        prev = line
    return len(seen)
