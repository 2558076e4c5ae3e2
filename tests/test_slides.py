"""The slide-generation multi-level reward (glm5_ref.apps.slides, GLM-5 section 4.2.5).

Hand-written pages: a clean 16:9 slide must score a higher total than each defective one (overflowing,
overlapping, nearly blank, a hallucinated image, overflow hidden by a clipping style, malformed). Tests that
need a browser are skipped when no chromium is installed (scripts/setup_browser.sh installs it); each page is
rendered at most once per test process (a module-level cache), so the file stays fast and order-free.
"""
import base64
import math
import os
import struct
import zlib

import pytest

from glm5_ref.apps import slides
from glm5_ref.apps.slides import aspect_reward, chromium_path, slide_reward, whitespace_ratios

needs_browser = pytest.mark.skipif(chromium_path() is None,
                                   reason="no chromium installed (scripts/setup_browser.sh installs it)")


def _png(w: int, h: int, rgb: tuple[int, int, int]) -> bytes:
    """A solid-colour RGB PNG, written by hand (zlib + CRC), so the test needs no image library."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    raw = b"".join(b"\0" + bytes(rgb) * w for _ in range(h))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


IMG = "data:image/png;base64," + base64.b64encode(_png(8, 8, (30, 120, 200))).decode()
CSS = """body { margin: 0; }
.slide { width: 1280px; height: 720px; box-sizing: border-box; padding: 60px 80px; position: relative;
         font-family: sans-serif; background: #fdfdfd; color: #222; }
h1 { font-size: 52px; margin: 0 0 40px 0; }
ul { font-size: 30px; line-height: 1.5; width: 620px; margin: 0; padding-left: 30px; }
.figure { position: absolute; right: 80px; top: 200px; width: 420px; height: 420px; }"""
BULLETS = ["Revenue grew 24% year over year", "Three new markets opened in Asia", "Operating margin improved to 18%",
           "Customer retention reached 94%", "Headcount stable at 1,200"]
MORE = [f"Point number {i} with some explanatory words" for i in range(16)]


def page(css: str = "", bullets=BULLETS, img: str | None = IMG, title="Quarterly results: growth in every region",
         body_extra: str = "") -> str:
    items = "".join(f"<li>{b}</li>" for b in bullets)
    figure = f'<img class="figure" src="{img}" alt="chart">' if img else ""
    return (f"<!DOCTYPE html><html><head><style>{CSS}\n{css}</style></head><body><div class=\"slide\">"
            f"<h1>{title}</h1><ul>{items}</ul>{figure}</div>{body_extra}</body></html>")


PAGES = {
    "good": page(),
    "overflowing": page(".slide { height: auto; min-height: 720px; }", bullets=BULLETS + MORE),
    "overlapping": page(".figure { left: 60px; top: 120px; }"),
    "nearly_blank": ('<!DOCTYPE html><html><body style="margin:0"><div style="width:1280px;height:720px;'
                     'background:#fff"><p style="margin:0;font-size:14px">Hi</p></div></body></html>'),
    "hallucinated_image": page(img="https://example.com/chart.png"),
    "clipped_hack": page(".slide { overflow: hidden; }", bullets=BULLETS + MORE),
    "ellipsis_hack": page("h1 { white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }",
                            title="Quarterly results: growth in every region, every product line and every quarter"),
    "malformed": page().replace("</h1>", "</h2>").replace("</ul>", ""),
}
_cache: dict[str, dict] = {}


def score(name: str) -> dict:
    """slide_reward of PAGES[name] with the one given asset, computed once per test process."""
    if name not in _cache:
        _cache[name] = slide_reward(PAGES[name], [IMG])
    return _cache[name]


def live_in_group(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is ``pgid``, from a scan of /proc."""
    out = []
    for p in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{p}/stat") as f:
                st = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(st[2]) == pgid and st[0] != "Z":
            out.append(int(p))
    return out


# ---- no browser needed ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["", "   \n", None, b"<html></html>", 42],
                         ids=["empty", "blank", "none", "bytes", "int"])
def test_bad_html_raises_value_error_naming_the_argument(bad):
    with pytest.raises(ValueError, match=r"html: expected a non-empty str"):
        slide_reward(bad)


@pytest.mark.parametrize("kwargs, match", [({"assets": "a.png"}, "assets"), ({"assets": [3]}, "assets"),
                                           ({"assets": 5}, "assets"), ({"timeout_s": 0}, "timeout_s"),
                                           ({"timeout_s": math.nan}, "timeout_s"), ({"timeout_s": "9"}, "timeout_s")])
def test_bad_arguments_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        slide_reward("<p>x</p>", **kwargs)


def test_malformed_html_gets_level1_zero_not_an_exception():
    r = score("malformed")  # not rendered, so this runs without a browser too
    assert r["level1"] == r["level2"] == r["level3"] == r["total"] == 0.0
    errors = r["details"]["level1"]["parse"]["errors"]
    assert any("</h2>" in e for e in errors) and any("<ul>" in e for e in errors)
    assert "does not parse" in r["details"]["render"]["error"]


@pytest.mark.parametrize("html", ['<div><img src="x', "<p>a<b</p>", '<div class="a">ok</div', "<!-- open", "</span>"],
                         ids=["open-tag", "bad-tag-name", "open-end-tag", "open-comment", "stray-end-tag"])
def test_unterminated_or_stray_markup_fails_to_parse(html):
    assert slide_reward(html)["details"]["level1"]["parse"]["ok"] is False


def test_level1_image_and_style_rules():
    html = ('<div style="font-size:10px"><img src="a.png"><img src="a.png"><img src="b.png">'
            '<p style="color:#fff;background-color:white;line-height:0.8">&lt;b&gt; is text</p>'
            '<table><tr><td>1<td>2</table><svg><rect width="1" height="1"/></svg></div>')
    level1, d = slides._level1(html, {"a.png"})
    assert d["parse"]["ok"], d["parse"]["errors"]  # escaped markup, optional end tags, svg leaves are valid
    assert d["images"]["hallucinated"] == ["b.png"] and d["images"]["duplicated"] == ["a.png"]
    assert d["images"]["score"] == pytest.approx(1 / 3)
    assert len(d["style"]["violations"]) == 3  # font size, colour = background, cramped line height
    assert level1 == pytest.approx((1 / 3) * (1 - 0.2 * 3))
    css_image = slides._level1('<div style="background:url(\'c.png\')">x</div>', set())[1]["images"]
    assert css_image["hallucinated"] == ["c.png"]


def test_aspect_reward_is_asymmetric():
    assert aspect_reward(1280, 720) == 1.0
    assert aspect_reward(1280, 720 * 1.1) < aspect_reward(1280 * 1.1, 720) < 1.0  # taller costs more than wider
    assert aspect_reward(1280, 2000) < 1e-6 and aspect_reward(0, 720) == 0.0


def test_whitespace_ratios_blank_versus_busy():
    import io

    import matplotlib.image as mpimg
    import numpy as np
    blank, busy = np.ones((360, 640, 3)), np.ones((360, 640, 3))
    busy[::12] = 0.0  # dark lines everywhere, like dense text
    pngs = []
    for a in (blank, busy):
        buf = io.BytesIO()
        mpimg.imsave(buf, a, format="png")
        pngs.append(buf.getvalue())
    assert whitespace_ratios(pngs[0]) == (0.0, 0.0)
    assert min(whitespace_ratios(pngs[1])) > 0.9


def test_no_chromium_raises_runtime_error(monkeypatch):
    monkeypatch.setattr(slides, "chromium_path", lambda: None)
    with pytest.raises(RuntimeError, match="setup_browser"):
        slide_reward(PAGES["good"], [IMG])


# ---- in a real headless chromium ----------------------------------------------------------------------------
@needs_browser
def test_good_slide_scores_high():
    r = score("good")
    d2 = r["details"]["level2"]
    assert r["details"]["render"]["ok"], r["details"]["render"]["error"]
    assert d2["document"] == [1280, 720] and d2["aspect"] == 1.0 and d2["broken_images"] == 0
    assert d2["clipped_elements"] == [] and d2["overlapping_pairs"] == []
    assert r["level1"] == 1.0 and r["level2"] > 0.99 and r["total"] > 0.9


@needs_browser
@pytest.mark.parametrize("name", [n for n in PAGES if n != "good"])
def test_every_defective_page_scores_below_the_good_one(name):
    r, good = score(name), score("good")
    assert r["total"] < good["total"] - 0.2, (name, r["total"], good["total"])
    d = r["details"]
    if name == "overflowing":
        assert d["level2"]["document"][1] > 720 and d["level2"]["aspect"] < 0.01 and d["level2"]["overflow"] < 0.9
    elif name == "overlapping":
        assert d["level2"]["overlap"] < 0.8 and d["level2"]["overlapping_pairs"]
    elif name == "nearly_blank":
        assert r["level3"] < 0.05 and d["level3"]["content_ratio_full"] < 0.05
    elif name == "hallucinated_image":
        assert d["level1"]["images"]["hallucinated"] == ["https://example.com/chart.png"] and r["level1"] == 0.0
    elif name.endswith("_hack"):  # the document stays 16:9, but the clipped content is measured where it would be
        assert d["level2"]["document"] == [1280, 720] and d["level2"]["measured"] != [1280, 720]
        assert d["level2"]["clipping"] < 0.6 and d["level2"]["clipped_elements"] and d["level2"]["aspect"] < 0.1


@needs_browser
def test_hiding_the_overflow_buys_nothing_over_showing_it():
    assert score("clipped_hack")["total"] <= score("overflowing")["total"] + 1e-9


@needs_browser
@pytest.mark.parametrize("name", list(PAGES))
def test_levels_are_floats_in_the_unit_interval(name):
    r = score(name)
    for k in ("level1", "level2", "level3", "total"):
        assert isinstance(r[k], float) and 0.0 <= r[k] <= 1.0, (k, r[k])
    assert r["total"] == pytest.approx((r["level1"] * r["level2"] * r["level3"]) ** (1 / 3))


@needs_browser
def test_the_browser_is_gone_after_the_call():
    info = score("good")["details"]["render"]
    pid = info["browser_pid"]
    assert not os.path.exists(f"/proc/{pid}"), "the browser was not reaped"
    assert live_in_group(pid) == [], "a chromium child outlived the call"
    assert info["group_gone"] and not os.path.exists(info["workdir"]), "the temporary user-data-dir is left"


@needs_browser
def test_render_timeout_gives_zero_levels_with_the_reason():
    r = slide_reward(page(body_extra="<script>while (true) {}</script>"), [IMG], timeout_s=2.0)
    info = r["details"]["render"]
    assert r["level1"] == 1.0 and r["level2"] == r["level3"] == r["total"] == 0.0
    assert "timeout" in info["error"] and info["seconds"] < 6
    assert live_in_group(info["browser_pid"]) == [] and not os.path.exists(info["workdir"])


@needs_browser
def test_page_scripts_cannot_fake_the_measurements():
    fake = ("<script>Element.prototype.getBoundingClientRect = () => ({left: 0, top: 0, width: 1, height: 1});"
            "Object.defineProperty(Element.prototype, 'scrollHeight', {get() { return 1; }});</script>")
    r = slide_reward(page(".slide { height: auto; min-height: 720px; }", bullets=BULLETS + MORE, body_extra=fake),
                     [IMG])
    assert r["details"]["level2"]["document"][1] > 720 and r["total"] < score("good")["total"] - 0.2


@needs_browser
def test_a_local_file_asset_renders(tmp_path):
    path = tmp_path / "chart.png"
    path.write_bytes(_png(8, 8, (200, 60, 30)))
    r = slide_reward(page(img=str(path)), [path])
    assert r["details"]["level1"]["images"]["hallucinated"] == [] and r["details"]["level2"]["broken_images"] == 0
    assert r["total"] > 0.9
