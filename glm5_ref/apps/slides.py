"""The slide-generation multi-level reward (GLM-5 report section 4.2.5), measured in a real headless Chromium.

GLM-5 trains its HTML slide generator with three reward levels (section 4.2.5): 1 "static markup attributes"
(the HTML parses; positioning, spacing, colour, typography rules; "hallucinated-image and duplicate-image
detection"), 2 "runtime rendering properties" (element sizes, bounding boxes; 16:9 compliance rose from 40% to
92%), 3 "visual perceptual features" ("abnormal whitespace patterns"). Its reward hacks, "hard truncation of
overlong content or excessive manipulation of spacing", were fixed in the renderer. ``slide_reward(html,
assets)`` returns "level1", "level2", "level3", "total" in [0, 1] and the per-check "details".

Formulas (level 2 and 3 follow the companion AeSlides code, arXiv 2604.22840, github ympan0508/aeslides)
    level1 = 0 if the markup does not parse, else (1 - bad_images / images) * max(0, 1 - 0.2 * style_violations);
             a bad image's src is not among ``assets`` (hallucinated) or was cited before (duplicate)
    level2 = aspect * overflow * overlap * clipping
      aspect   = exp(-16 e^2 - 64 max(-e - 0.04, 0)^2), e = ln((W / H) / (16/9)) (AeSlides' asymmetric reward:
                 taller than 16:9 costs more than wider); at a 1280-px-wide viewport H = max(document height,
                 content extent), W = max(1280, content extent): clipped content counts where it would be
      overflow = 1 - (content area outside the 1280x720 slide box) / (content area)
      overlap  = max(0, 1 - 2 * (sum of pairwise intersections of content boxes) / (content area))
      clipping = prod_k (clientW clientH / scrollW scrollH)_k over the elements whose overflow style clips
      content boxes: line boxes of visible text nodes (Range.getClientRects); img, svg, canvas, video, iframe
    level3 = smoothstep((r_full + r_crop) / 2; 0.35, 0.85), r = content fraction of AeSlides' whitespace map of
             the screenshot (grey, Gaussian blur 21x21, local std in a 201x151 box, clip at 50, / 50, > 0.05),
             over the image and over a crop without its top 15% and 10% of each other side
    total  = (level1 * level2 * level3) ** (1/3), a geometric mean: 0 when any level is 0

Choices where the paper is silent (ours, [I] in shared/reference/post_training_sources.md section 8)
    * Level weights and gating, 0.2 per style violation, the 2 in overlap, the level-3 band. Style rules: font
      size < 12 px, text colour = background, line-height < 1 or letter-spacing < -0.05em (cramped spacing).
    * Hard truncation (overflow:hidden, text-overflow:ellipsis, line-clamp) costs its hidden fraction
      (scrollWidth/Height against clientWidth/Height), and the hidden content still counts in aspect and
      overflow: clipping an overlong page scores no better than letting it overflow (the renderer fix).
    * Measurements run in an isolated JavaScript world, which the page's scripts cannot tamper with; the
      network is blocked. Images match ``assets`` verbatim (data URI, URL, path; relative paths of existing
      files are copied next to the page). Markup that does not parse is not rendered (level2 = level3 = 0).
    * A failed render, or one past ``timeout_s``, gives level2 = level3 = 0 and the reason in
      details["render"]["error"] (no exception); no chromium at all raises RuntimeError. The browser runs in
      its own process group with a fresh user-data-dir; a ``finally`` kills the group, waits, removes the dir.

Not handled: multi-page decks, AeSlides' centroid balance, saturation, contrast short of equal colours,
external stylesheets, fonts not installed, animation; the GRPO group normalisation is glm5_ref.rl's.
"""
from __future__ import annotations

import base64
import contextlib
import fcntl
import io
import json
import math
import os
import re
import select
import shutil
import signal
import tempfile
import time
from html.parser import HTMLParser

import numpy as np

__all__ = ["slide_reward", "chromium_path", "aspect_reward", "whitespace_ratios"]

SLIDE_W, SLIDE_H, MAX_H = 1280, 720, 7680
_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "param", "source", "track",
         "wbr", "image", "path", "circle", "rect", "line", "polyline", "polygon", "ellipse", "stop", "use"}
_OPTIONAL_END = {"p", "li", "dt", "dd", "tr", "td", "th", "thead", "tbody", "tfoot", "option", "optgroup",
                 "colgroup", "rt", "rp", "html", "head", "body", "caption"}
_FLAGS = ("--headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking "
          "--disable-component-update --disable-sync --disable-extensions --disable-breakpad --disable-crash-reporter "
          "--disable-dev-shm-usage --no-default-browser-check --hide-scrollbars --mute-audio "
          f"--force-device-scale-factor=1 --window-size={SLIDE_W},{SLIDE_H} --remote-debugging-pipe").split()


def chromium_path() -> str | None:
    """The chromium to use: $GLM5_CHROMIUM, /usr/bin/chromium, or chromium or chrome on PATH; None if none."""
    cands = (os.environ.get("GLM5_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"), shutil.which("chrome"))
    return next((c for c in cands if c and os.path.isfile(c) and os.access(c, os.X_OK)), None)


# ---- level 1: static markup ------------------------------------------------------------------------------
class _Markup(HTMLParser):
    """html.parser plus the strictness it lacks: unclosed, stray and unterminated tags are errors."""

    def __init__(self):
        super().__init__(convert_charrefs=False)  # so that an escaped &lt; never looks like markup
        self.stack, self.errors, self.images, self.styles, self.lt = [], [], [], [], False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if not re.fullmatch(r"[a-z][a-z0-9:._-]*", tag):
            self.errors.append(f"line {self.getpos()[0]}: invalid tag name <{tag}")
        if tag == "img" or (tag == "image" and ("href" in a or "xlink:href" in a)):
            self.images.append((a.get("src") or a.get("href") or a.get("xlink:href") or "").strip())
        self.styles += [a["style"]] if a.get("style") else []
        if tag not in _VOID:
            self.stack.append((tag, self.getpos()[0]))

    def handle_endtag(self, tag):
        if tag not in [t for t, _ in self.stack]:
            if tag not in _VOID:
                self.errors.append(f"line {self.getpos()[0]}: stray </{tag}> with no open <{tag}>")
            return
        while self.stack[-1][0] != tag:  # only elements with optional end tags may close implicitly
            t, line = self.stack.pop()
            if t not in _OPTIONAL_END:
                self.errors.append(f"line {line}: <{t}> is not closed before </{tag}>")
        self.stack.pop()

    def handle_data(self, data):  # html.parser hands an unterminated tag on as text: "<" then "img src=..."
        top = self.stack[-1][0] if self.stack else ""
        if top == "style":
            self.styles.append(data)
        elif top != "script" and (re.search(r"<[A-Za-z/!]", data) or self.lt and re.match(r"[A-Za-z/!]", data)):
            self.errors.append(f"line {self.getpos()[0]}: unterminated or invalid markup {data.strip()[:40]!r}")
        self.lt = data == "<"


def _colour(v: str) -> str:
    v = v.lower().replace(" ", "").replace("!important", "")
    v = "#" + "".join(c * 2 for c in v[1:]) if re.fullmatch(r"#[0-9a-f]{3}", v) else v
    return {"white": "#ffffff", "black": "#000000", "rgb(255,255,255)": "#ffffff", "rgb(0,0,0)": "#000000"}.get(v, v)


def _style_rules(blocks: list[str]) -> tuple[list[str], list[str]]:
    """(violations, background-image urls) of inline style attributes and <style> rule bodies."""
    bad, urls = [], []
    for body in [r for b in blocks for r in (re.findall(r"\{([^{}]*)\}", b) or [b])]:
        decl = {k.strip().lower(): v.strip() for k, v in (p.split(":", 1) for p in body.split(";") if ":" in p)}
        fs = re.fullmatch(r"([\d.]+)(px|pt|rem)", decl.get("font-size", "").replace(" ", "").lower())
        if fs and float(fs[1]) * {"px": 1.0, "pt": 4 / 3, "rem": 16.0}[fs[2]] < 12:
            bad.append(f"font-size {decl['font-size']} is below 12px")
        bg = decl.get("background-color") or decl.get("background", "")
        if "color" in decl and bg and _colour(decl["color"]) == _colour(bg):
            bad.append(f"text colour {decl['color']} equals the background")
        if re.fullmatch(r"[\d.]+", lh := decl.get("line-height", "")) and float(lh) < 1.0:
            bad.append(f"line-height {lh} below 1 (cramped spacing)")
        ls = re.fullmatch(r"(-[\d.]+)(em|px)", decl.get("letter-spacing", "").replace(" ", ""))
        if ls and float(ls[1]) / (16.0 if ls[2] == "px" else 1.0) < -0.05:
            bad.append(f"letter-spacing {decl['letter-spacing']} (cramped spacing)")
        urls += re.findall(r"background(?:-image)?\s*:[^{}]*?url\(\s*['\"]?([^'\")]*)", body)  # data URIs hold ';'
    return bad, [u.strip() for u in urls if u.strip() and not u.startswith("#")]


def _level1(html: str, assets: set[str]) -> tuple[float, dict]:
    p = _Markup()
    try:
        p.feed(html)
        p.close()
        p.errors += [f"line {line}: <{t}> is never closed" for t, line in p.stack if t not in _OPTIONAL_END]
    except Exception as e:  # noqa: BLE001  html.parser gives up on a few inputs: a parse failure too
        p.errors.append(f"parser error: {e}")
    violations, css_urls = _style_rules(p.styles)
    seen, halluc, dup, srcs = set(), [], [], p.images + css_urls
    for s in srcs:
        (halluc if s not in assets else dup if s in seen else []).append(s[:80] or "(empty src)")
        seen.add(s)
    img = 1.0 - (len(halluc) + len(dup)) / len(srcs) if srcs else 1.0
    sty = max(0.0, 1.0 - 0.2 * len(violations))
    return (0.0 if p.errors else img * sty), {
        "parse": {"ok": not p.errors, "errors": p.errors[:20]}, "style": {"violations": violations, "score": sty},
        "images": {"count": len(srcs), "hallucinated": halluc, "duplicated": dup, "score": img}}


# ---- level 2: Chromium over the DevTools protocol on a pipe (--remote-debugging-pipe) ----------------------
_HEIGHT_JS = """document.fonts.ready.then(() => { const b = document.body || {}, h = document.documentElement; return {
  height: Math.max(b.scrollHeight || 0, b.offsetHeight || 0, h.clientHeight, h.scrollHeight, h.offsetHeight) || 1,
  width: Math.max(b.scrollWidth || 0, h.scrollWidth) || 1}; })"""
_LAYOUT_JS = """(() => { const W = %d, H = %d, items = [], clipped = [], box = r => [r.left, r.top, r.width, r.height];
  const shown = el => { for (let e = el; e; e = e.parentElement) { const s = getComputedStyle(e); if (s.display
    === 'none' || s.visibility !== 'visible' || parseFloat(s.opacity) === 0) return false; } return true; };
  const walker = document.createTreeWalker(document.body || document.documentElement, NodeFilter.SHOW_TEXT);
  for (let n = walker.nextNode(); n; n = walker.nextNode()) { const p = n.parentElement;
    if (!p || !n.textContent.trim() || /^(SCRIPT|STYLE|NOSCRIPT|TEMPLATE)$/.test(p.tagName) || !shown(p)) continue;
    const rg = document.createRange(); rg.selectNodeContents(n);
    const rs = Array.from(rg.getClientRects()).filter(r => r.width > 0 && r.height > 0).map(box);
    if (rs.length) items.push({tag: p.tagName.toLowerCase(), rects: rs}); }
  for (const el of document.querySelectorAll('img, svg, canvas, video, iframe')) { const r = el.getBoundingClientRect();
    if (!(el.tagName.toLowerCase() === 'svg' && el.parentElement && el.parentElement.closest('svg'))
        && r.width > 0 && r.height > 0 && shown(el)) items.push({tag: el.tagName.toLowerCase(), rects: [box(r)]}); }
  for (const el of (document.body ? document.body.querySelectorAll('*') : [])) { const s = getComputedStyle(el);
    const cw = el.clientWidth, ch = el.clientHeight, sw = el.scrollWidth, sh = el.scrollHeight;
    if ((s.overflowX !== 'visible' || s.overflowY !== 'visible') && cw * ch > 0 && (sw > cw + 2 || sh > ch + 2))
      clipped.push({tag: el.tagName.toLowerCase(), client: [cw, ch], scroll: [sw, sh]}); }
  const inter = (a, b, m) => Math.max(0, Math.min(a[0] + a[2], b[0] + b[2]) - Math.max(a[0], b[0]) - m) *
                             Math.max(0, Math.min(a[1] + a[3], b[1] + b[3]) - Math.max(a[1], b[1]) - m);
  let area = 0, outside = 0, overlap = 0, x0 = 0, y0 = 0, x1 = W, y1 = 0; const pairs = [];
  for (const it of items) for (const r of it.rects) {
    area += r[2] * r[3]; outside += r[2] * r[3] - inter(r, [-1, -1, W + 2, H + 2], 0);
    x0 = Math.min(x0, r[0]); y0 = Math.min(y0, r[1]); x1 = Math.max(x1, r[0] + r[2]); y1 = Math.max(y1, r[1] + r[3]); }
  for (let i = 0; i < items.length; i++) for (let j = i + 1; j < items.length; j++) { let o = 0;
    for (const a of items[i].rects) for (const b of items[j].rects) o += inter(a, b, 2);  // touching is not overlapping
    if (o > 0) { overlap += o; if (pairs.length < 10) pairs.push([items[i].tag, items[j].tag, Math.round(o)]); } }
  const broken_images = Array.from(document.images).filter(i => i.complete && i.naturalWidth === 0).length;
  return {items: items.length, area, outside, overlap, pairs, clipped, broken_images, extent: [x1 - x0, y1 - y0]};
})()""" % (SLIDE_W, SLIDE_H)


class _RenderError(Exception):
    pass


class _Cdp:
    """A minimal DevTools client: NUL-terminated JSON messages, commands on fd 3 of the browser, replies on fd 4."""

    def __init__(self, wfd: int, rfd: int, deadline: float):
        self.wfd, self.rfd, self.deadline, self.buf, self.n, self.events = wfd, rfd, deadline, bytearray(), 0, []
        self.poll = select.poll()  # not select.select: that fails on descriptors above 1023
        self.poll.register(rfd, select.POLLIN)

    def _read(self) -> dict:
        while (i := self.buf.find(b"\0")) < 0:
            left = self.deadline - time.monotonic()
            if left <= 0 or not self.poll.poll(left * 1000):
                raise TimeoutError
            if not (chunk := os.read(self.rfd, 1 << 20)):
                raise _RenderError("the browser closed the DevTools pipe (it crashed or failed to start)")
            self.buf += chunk
        msg = json.loads(self.buf[:i])
        del self.buf[:i + 1]
        if msg.get("method") in ("Inspector.targetCrashed", "Target.targetCrashed"):
            raise _RenderError("the page crashed the renderer")
        return msg

    def call(self, method: str, params: dict | None = None, session: str | None = None) -> dict:
        self.n += 1
        os.write(self.wfd, json.dumps({"id": self.n, "method": method, "params": params or {},
                                       **({"sessionId": session} if session else {})}).encode() + b"\0")
        while (m := self._read()).get("id") != self.n:
            self.events.append(m)
        if "error" in m:
            raise _RenderError(f"{method}: {m['error'].get('message')}")
        return m.get("result", {})

    def evaluate(self, expr: str, ctx: int, session: str):
        r = self.call("Runtime.evaluate", {"expression": expr, "contextId": ctx, "returnByValue": True,
                                           "awaitPromise": True}, session)
        if "exceptionDetails" in r:
            raise _RenderError(f"the measurement script failed: {r['exceptionDetails'].get('text')}")
        return r["result"]["value"]

    def wait_event(self, method: str) -> dict:
        while not any(m.get("method") == method for m in self.events):
            self.events.append(self._read())
        return self.events.pop(next(k for k, m in enumerate(self.events) if m.get("method") == method))


def _group_alive(pgid: int) -> bool:
    """Whether process group ``pgid`` has a live member (a zombie is dead: it only waits for init to reap it)."""
    for p in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError), open(f"/proc/{p}/stat") as f:  # a process may end meanwhile
            st = f.read().rsplit(")", 1)[1].split()
            if int(st[2]) == pgid and st[0] != "Z":
                return True
    return False


def _render(html: str, assets: set[str], timeout_s: float, info: dict) -> tuple[dict, bytes]:
    """Render ``html`` 1280 px wide: (measurements, PNG screenshot). The browser never outlives this call."""
    if (exe := chromium_path()) is None:
        raise RuntimeError("slide_reward: no chromium found (expected /usr/bin/chromium); run scripts/setup_browser.sh")
    tmp, pid, fds = tempfile.mkdtemp(prefix="glm5_slides_"), None, []
    info["workdir"] = tmp  # the page, the profile (user-data-dir) and the browser's stderr; removed at the end
    try:
        os.makedirs(page := os.path.join(tmp, "page"))
        for a in assets:  # relative asset files are copied next to the page so that they render
            if not a.startswith(("data:", "/")) and ".." not in a and "://" not in a and os.path.isfile(a):
                os.makedirs(os.path.dirname(os.path.join(page, a)), exist_ok=True)
                shutil.copyfile(a, os.path.join(page, a))
        with open(os.path.join(page, "index.html"), "w", encoding="utf-8") as f:
            f.write(html)
        argv = [exe, *_FLAGS, "--host-resolver-rules=MAP * ~NOTFOUND", f"--user-data-dir={tmp}/profile", "about:blank"]
        to_r, to_w = os.pipe()  # the DevTools pipe: the browser reads commands on its fd 3, replies on fd 4
        from_r, from_w = os.pipe()
        hi = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (to_r, from_w)]  # >= 10: dup2 to 3, 4 is safe
        fds = [to_w, from_r, to_r, from_w, *hi]
        acts = [(os.POSIX_SPAWN_OPEN, fd, path, flags, 0o600) for fd, path, flags in ((0, os.devnull, os.O_RDONLY),
                (1, os.devnull, os.O_WRONLY), (2, f"{tmp}/stderr.log", os.O_WRONLY | os.O_CREAT))]
        acts += [(os.POSIX_SPAWN_DUP2, hi[0], 3), (os.POSIX_SPAWN_DUP2, hi[1], 4)]
        try:  # setsid: a new session, so the browser and all its children form one process group
            pid = info["browser_pid"] = os.posix_spawn(exe, argv, dict(os.environ), file_actions=acts, setsid=True)
        except OSError as e:
            raise _RenderError(f"could not start {exe}: {e}") from None
        while len(fds) > 2:  # the child's ends, now its own
            os.close(fds.pop())
        cdp = _Cdp(fds[0], fds[1], time.monotonic() + timeout_s)
        try:
            target = cdp.call("Target.createTarget", {"url": "about:blank"})["targetId"]
            sid = cdp.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            cdp.call("Page.enable", session=sid)
            metrics = {"width": SLIDE_W, "height": 10, "deviceScaleFactor": 1, "mobile": False}
            cdp.call("Emulation.setDeviceMetricsOverride", metrics, session=sid)  # a tiny height, as AeSlides
            frame = cdp.call("Page.navigate", {"url": f"file://{page}/index.html"}, session=sid)["frameId"]
            cdp.wait_event("Page.loadEventFired")
            world = {"frameId": frame, "worldName": "glm5_reward"}  # the page's own scripts cannot reach it
            ctx = cdp.call("Page.createIsolatedWorld", world, session=sid)["executionContextId"]
            size = cdp.evaluate(_HEIGHT_JS, ctx, sid)
            metrics["height"] = int(max(1, min(math.ceil(size["height"]), MAX_H)))  # then the full page, capped
            cdp.call("Emulation.setDeviceMetricsOverride", metrics, session=sid)
            out = {**size, **cdp.evaluate(_LAYOUT_JS, ctx, sid)}
            return out, base64.b64decode(cdp.call("Page.captureScreenshot", {"format": "png"}, session=sid)["data"])
        except TimeoutError:
            raise _RenderError(f"render timeout: no result within timeout_s={timeout_s:g} s") from None
        except (OSError, _RenderError) as e:
            with open(f"{tmp}/stderr.log", errors="replace") as f:
                tail = f.read()[-300:].strip()
            raise _RenderError(f"{e}; browser stderr: {tail}" if tail else str(e)) from None
    finally:
        if pid is not None:  # the whole group is killed (nothing in it is worth a clean exit), reaped, waited for
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            end = time.monotonic() + 2.0
            while (alive := _group_alive(pid)) and time.monotonic() < end:
                time.sleep(0.02)
            info["group_gone"] = not alive
        for fd in fds:
            os.close(fd)
        shutil.rmtree(tmp, ignore_errors=True)


def aspect_reward(w: float, h: float, alpha: float = 16.0, beta: float = 64.0, margin: float = 0.04) -> float:
    """AeSlides' asymmetric reward exp(-alpha e^2 - beta max(-e - margin, 0)^2), e = ln((w / h) / (16 / 9))."""
    if w <= 0 or h <= 0:
        return 0.0
    e = math.log((w / h) / (SLIDE_W / SLIDE_H))
    return math.exp(-alpha * e * e - beta * max(-e - margin, 0.0) ** 2)


def _level2(m: dict) -> tuple[float, dict]:
    w, h = max(SLIDE_W, m["extent"][0]), max(m["height"], m["extent"][1])  # what the content needs, hidden or not
    aspect, area = aspect_reward(w, h), max(m["area"], 1e-9)
    overflow = 1.0 - min(1.0, m["outside"] / area)
    overlap = max(0.0, 1.0 - 2.0 * m["overlap"] / area)
    clipping = math.prod(min(1.0, math.prod(c["client"]) / math.prod(c["scroll"])) for c in m["clipped"])
    return aspect * overflow * overlap * clipping, {
        "document": [m["width"], m["height"]], "measured": [w, h], "aspect": aspect, "overflow": overflow,
        "overlap": overlap, "clipping": clipping, "clipped_elements": m["clipped"][:10], "content_items": m["items"],
        "overlapping_pairs": m["pairs"], "broken_images": m["broken_images"]}


# ---- level 3: the whitespace map of the screenshot (AeSlides whitespace.py, in numpy) ----------------------
def _filter_rows(x: np.ndarray, k: int, gauss: bool) -> np.ndarray:
    """k taps along axis 1: OpenCV's GaussianBlur (default sigma, reflect-101) or normalised boxFilter (reflect)."""
    r, n = k // 2, x.shape[1]
    xp = np.pad(x, ((0, 0), (r, r)), mode="reflect" if gauss else "symmetric")
    if gauss:
        s = 0.3 * ((k - 1) * 0.5 - 1) + 0.8
        g = np.exp(-((np.arange(k) - r) ** 2) / (2 * s * s))
        return sum((g[i] / g.sum()) * xp[:, i:i + n] for i in range(k))
    c = np.concatenate([np.zeros((x.shape[0], 1)), np.cumsum(xp, axis=1)], axis=1)
    return (c[:, k:k + n] - c[:, :n]) / k


def whitespace_ratios(png: bytes, thr: float = 0.05) -> tuple[float, float]:
    """(content fraction of the whole image, of the crop without its top 15% and 10% of each other side)."""
    import matplotlib.image as mpimg  # here: only level 3 needs matplotlib, which is slow to import
    img = mpimg.imread(io.BytesIO(png), format="png")[..., :3].astype(np.float64)
    grey = (img @ np.array([0.299, 0.587, 0.114])) * 255.0
    two_d = lambda x, kx, ky, gauss: _filter_rows(_filter_rows(x, kx, gauss).T, ky, gauss).T  # noqa: E731
    b = two_d(grey, 21, 21, True)
    mean, mean_sq = two_d(b, 201, 151, False), two_d(b * b, 201, 151, False)  # 201 wide, 151 high
    content = np.clip(np.sqrt(np.maximum(mean_sq - mean * mean, 0.0)), 0, 50) / 50 > thr
    h, w = content.shape
    crop = content[int(h * 0.15):int(h * 0.9), int(w * 0.1):int(w * 0.9)]
    return float(content.mean()), float(crop.mean()) if crop.size else 0.0


# ---- the reward ------------------------------------------------------------------------------------------
def slide_reward(html: str, assets=(), *, timeout_s: float = 20.0) -> dict:
    """Score one HTML slide: {"level1", "level2", "level3", "total", "details"}; see the module docstring.
    html: the page; assets: the image sources the model was given (str or path-like), to be cited verbatim;
    timeout_s: the render's wall-clock limit (past it level2 = level3 = 0 with the reason, no exception).
    Raises ValueError on bad arguments and RuntimeError when no chromium is installed."""
    if not isinstance(html, str) or not html.strip():
        raise ValueError(f"html: expected a non-empty str of HTML, got {type(html).__name__} {str(html)[:40]!r}")
    items = list(assets) if hasattr(assets, "__iter__") and not isinstance(assets, (str, bytes)) else None
    if items is None or not all(isinstance(a, (str, os.PathLike)) for a in items):
        raise ValueError(f"assets: expected an iterable of image sources (str or path-like), got {assets!r:.60}")
    asset_set = {str(os.fspath(a)).strip() for a in items}
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not 0 < timeout_s < math.inf:
        raise ValueError(f"timeout_s: expected a positive finite number of seconds, got {timeout_s!r}")
    l1, d1 = _level1(html, asset_set)
    unparsed = None if d1["parse"]["ok"] else "not rendered: the markup does not parse (level 1)"
    details = {"level1": d1, "level2": {}, "level3": {}, "render": {"ok": False, "error": unparsed}}
    l2 = l3 = 0.0
    if unparsed is None:
        t0 = time.monotonic()
        try:
            m, png = _render(html, asset_set, timeout_s, details["render"])
            l2, details["level2"] = _level2(m)
            full, crop = whitespace_ratios(png)
            t = min(1.0, max(0.0, (0.5 * (full + crop) - 0.35) / 0.5))
            l3 = t * t * (3 - 2 * t)  # smoothstep
            details["level3"] = {"content_ratio_full": full, "content_ratio_crop": crop, "score": l3}
            details["render"]["ok"] = True
        except _RenderError as e:
            details["render"]["error"] = str(e)
        details["render"]["seconds"] = round(time.monotonic() - t0, 3)
    l1, l2, l3 = (float(min(1.0, max(0.0, v))) for v in (l1, l2, l3))
    return {"level1": l1, "level2": l2, "level3": l3, "total": (l1 * l2 * l3) ** (1 / 3), "details": details}
