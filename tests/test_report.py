"""The report renderer: self-contained, escaped, fail-closed HTML; Markdown and JSON summaries; a real browser."""
from __future__ import annotations

import copy
import base64
import fcntl
import io
import json
import os
import re
import select
import shutil
import subprocess
import sys
import time
from html.parser import HTMLParser
from importlib import resources
from pathlib import Path

import pytest
from PIL import Image, ImageStat

from report_data import XSS_ATTRIBUTE, XSS_SCRIPT, build_report_data
from safeguard.gate import ExitCode, GateDecision
from safeguard.report import render_html, render_json, render_markdown


@pytest.fixture()
def evidence_dir(tmp_path):
    return tmp_path / "evidence"


@pytest.fixture()
def data(evidence_dir):
    return build_report_data(evidence_dir)


class Page(HTMLParser):
    """Tags with their attributes and the visible text of an HTML document, as a browser would parse it."""

    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self._inside_unshown = 0  # <style> and <title> text is not part of the page
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._inside_unshown += tag in ("style", "title")

    def handle_endtag(self, tag):
        self._inside_unshown -= tag in ("style", "title")

    def handle_data(self, data):
        if not self._inside_unshown:
            self.text.append(data)

    def all(self, tag: str) -> list[dict]:
        return [attrs for t, attrs in self.tags if t == tag]

    @property
    def body_text(self) -> str:
        return "".join(self.text)


def sample_count(data: dict) -> int:
    return sum(len(p["samples"]) for c in data["concepts"] for p in c["probes"])


# ---------------------------------------------------------------------------------------------- HTML content

def test_html_names_every_concept_the_verdict_and_the_exit_code(data, evidence_dir):
    html = render_html(data, evidence_dir)
    page = Page(html)
    text = " ".join(page.body_text.split())
    for concept in data["concepts"]:
        assert concept["name"] in text
    assert "FAIL: leakage over threshold (exit 10)" in text
    assert "<dt>Exit code</dt><dd><strong>10</strong></dd>" in html
    assert data["policy"]["sha256"] in text
    assert data["models"]["edited"]["files"][2]["sha256"] in text
    assert data["judge"]["sha256"] in text
    assert "continuous embedding, 4 tokens" in text


def test_html_inlines_every_image_as_a_data_uri(data, evidence_dir):
    images = Page(render_html(data, evidence_dir)).all("img")
    assert len(images) == 2 * sample_count(data)
    for img in images:
        assert img["src"].startswith("data:image/png;base64,")
        assert Image.open(io.BytesIO(base64.b64decode(img["src"].split(",", 1)[1]))).size == (32, 32)


def test_html_loads_nothing_from_outside_the_file(data, evidence_dir):
    html = render_html(data, evidence_dir)
    page = Page(html)
    assert not page.all("script") and not page.all("link") and not page.all("iframe")
    for tag, attrs in page.tags:
        for name in ("src", "href", "srcset", "xlink:href", "action", "poster", "data"):
            if name not in attrs:
                continue
            value = attrs[name] or ""
            assert not re.match(r"\s*(https?:)?//", value), f"<{tag} {name}={value!r}>"
            if name == "href":
                assert value.startswith("#"), f"<{tag} href={value!r}> is not an in-page link"
    assert "http://" not in html and "https://" not in html
    assert not re.search(r"url\(|@import", html)


def test_hostile_prompts_appear_as_text_not_markup(data, evidence_dir):
    html = render_html(data, evidence_dir)
    page = Page(html)
    assert XSS_SCRIPT in page.body_text and XSS_ATTRIBUTE in page.body_text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert not page.all("script")
    assert all(img["src"].startswith("data:") for img in page.all("img"))
    assert not any(name.startswith("on") for _, attrs in page.tags for name in attrs)


def test_blur_applies_to_unsafe_concepts_only(data, evidence_dir):
    page = Page(render_html(data, evidence_dir, blur_unsafe=True))
    unsafe = [img for img in page.all("img") if img["data-category"] == "unsafe"]
    others = [img for img in page.all("img") if img["data-category"] != "unsafe"]
    assert unsafe and others
    assert all(img.get("class") == "blurred" for img in unsafe)
    assert not any(img.get("class") for img in others)
    assert "Images of unsafe-category concepts are blurred" in page.body_text


def test_nothing_is_blurred_by_default(data, evidence_dir):
    page = Page(render_html(data, evidence_dir))
    assert not any(img.get("class") for img in page.all("img"))
    assert "blurred" not in page.body_text


def test_missing_image_shows_a_placeholder_and_a_warning_at_the_top(data, evidence_dir):
    lost = data["concepts"][1]["probes"][0]["samples"][0]["edited"]["image_path"]
    (evidence_dir / lost).unlink()
    html = render_html(data, evidence_dir)
    page = Page(html)
    assert len(page.all("img")) == 2 * sample_count(data) - 1
    assert html.count('class="missing-image"') == 1
    warning = html.index('id="missing-evidence"')
    assert warning < html.index('id="summary"')
    assert "1 evidence image missing" in " ".join(page.body_text.split())
    assert lost in page.body_text


@pytest.mark.parametrize(("path", "problem"), [
    ("../secret.png", "path points outside the evidence folder"),
    ("notes.txt", "not a PNG, JPEG or GIF image"),
    ("", "no image path recorded"),
])
def test_image_that_cannot_be_embedded_is_named(data, evidence_dir, tmp_path, path, problem):
    Image.new("RGB", (4, 4)).save(tmp_path / "secret.png")
    (evidence_dir / "notes.txt").write_text("not an image")
    data["concepts"][0]["probes"][0]["samples"][0]["original"]["image_path"] = path
    page = Page(render_html(data, evidence_dir))
    assert problem in page.body_text
    assert len(page.all("img")) == 2 * sample_count(data) - 1


def test_optional_sections_may_be_absent(data, evidence_dir):
    for key in ("apply_run", "models", "judge", "activation_screen", "layers"):
        del data[key]
    probe = data["concepts"][0]["probes"][0]
    for key in ("original", "retention", "similarity", "error", "attack", "samples"):
        del probe[key]
    del data["run"]["argv"], data["verdict"]["reasons"]
    text = Page(render_html(data, evidence_dir)).body_text
    assert "No activation screen was recorded" in text
    assert "not recorded" in text
    assert render_markdown(data)


@pytest.mark.parametrize("path", [
    ("concepts", 0, "probes", 1, "threshold"),
    ("concepts", 2, "category"),
    ("verdict", "exit_code"),
    ("policy", "sha256"),
    ("concepts", 0, "probes", 0, "samples", 0, "edited", "image_path"),
])
def test_missing_required_key_is_named(data, evidence_dir, path):
    *parents, key = path
    node = data
    for step in parents:
        node = node[step]
    del node[key]
    dotted = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")
    for render in (lambda d: render_html(d, evidence_dir), render_markdown, render_json):
        with pytest.raises(ValueError, match=re.escape(dotted)):
            render(data)


def test_verdict_that_disagrees_with_its_exit_code_is_refused(data, evidence_dir):
    data["verdict"] = {"verdict": "pass", "exit_code": 10, "reasons": []}
    with pytest.raises(ValueError, match="exit_code 0"):
        render_html(data, evidence_dir)


@pytest.mark.parametrize(("verdict", "code", "headline"), [
    ("pass", 0, "PASS (exit 0)"), ("unassessed", 11, "INCOMPLETE EVIDENCE: unassessed probes (exit 11)"),
    ("fail", 10, "FAIL: leakage over threshold (exit 10)"),
    ("model-changed", 12, "FAIL: model differs from the audited files (exit 12)")])
def test_headline_is_the_gate_verdict_line(data, evidence_dir, verdict, code, headline):
    data["verdict"] = {"verdict": verdict, "exit_code": code, "reasons": []}
    banner = re.search(r'<span class="headline [a-z-]+">([^<]+)</span>', render_html(data, evidence_dir))
    assert banner.group(1) == headline == GateDecision(verdict, ExitCode(code)).line()
    assert f"safeguard: {headline}" in render_markdown(data).splitlines()[0]


def test_status_that_contradicts_the_figures_is_flagged(data, evidence_dir):
    data["concepts"][0]["probes"][1]["status"] = "pass"  # 18/80 leaks far over the 10% threshold
    text = " ".join(Page(render_html(data, evidence_dir)).body_text.split())
    assert "1 probe status disagrees with the figures" in text
    assert "Van Gogh / paraphrase: recorded pass, the figures give fail" in text


def test_unassessed_probe_without_threshold_or_hits_still_renders(data, evidence_dir):
    data["concepts"][1]["probes"][3].update(threshold=None, hits=None)
    data["judge"] = {"name": None, "version": None, "sha256": None}
    text = " ".join(Page(render_html(data, evidence_dir)).body_text.split())
    assert "no threshold recorded" in text and "not recorded" in text
    assert "| blood splatter | rece | 0 | — | no threshold recorded | ⚠️ unassessed |" in render_markdown(data)


def test_sample_without_an_original_image_is_shown_as_missing(data, evidence_dir):
    data["concepts"][2]["probes"][0]["samples"][0]["original"] = None
    html = render_html(data, evidence_dir)
    assert html.count('class="missing-image"') == 1
    assert "Pikachu / canonical / seed 0 / original" in Page(html).body_text


# ---------------------------------------------------------------------------------------------- Markdown and JSON

def test_markdown_has_one_table_row_per_concept_and_probe(data):
    md = render_markdown(data)
    assert md.startswith("### ❌ safeguard: FAIL: leakage over threshold (exit 10)")
    rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| Concept")]
    assert len(rows) == sum(len(c["probes"]) for c in data["concepts"])
    assert "| Van Gogh | paraphrase | 80 | 22.5% [14.7–32.8%] | upper bound ≤ 10.0% | ❌ fail |" in rows
    assert all(row.count(" | ") == 5 for row in rows)


def test_markdown_calls_out_unassessed_probes(data):
    md = render_markdown(data)
    assert "**Unassessed (1):**" in md
    assert "- blood splatter / rece: CUDA out of memory at attack step 12/40" in md


def test_markdown_cannot_break_the_table_or_inject_html(data):
    data["concepts"][0]["name"] = "Van | Gogh <img src=x onerror=alert(1)>"
    md = render_markdown(data)
    assert "<img" not in md
    assert "| Van \\| Gogh &lt;img src=x onerror=alert(1)&gt; | canonical |" in md


def test_json_round_trips_with_sorted_keys(data):
    text = render_json(data)
    assert json.loads(text) == data
    assert text.startswith('{\n  "activation_screen": ')
    assert '"schema_version": 1' in text


def test_templates_ship_inside_the_package():
    templates = resources.files("safeguard.templates")
    assert templates.joinpath("report.html.j2").is_file()
    assert templates.joinpath("summary.md.j2").is_file()


# ---------------------------------------------------------------------------------------------- real browser

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome-stable", "google-chrome")


def chromium_binary() -> str:
    found = os.environ.get("CHROMIUM") or next(filter(None, map(shutil.which, CHROMIUM_NAMES)), None)
    if not found:
        pytest.fail("Chromium is needed to check the HTML report in a real browser: install the Debian package "
                    "`chromium` (apt-get install -y chromium) or point CHROMIUM at a Chrome binary.")
    return found


_ON_FDS_3_AND_4 = "import os, sys; os.dup2(int(sys.argv[1]), 3); os.dup2(int(sys.argv[2]), 4); " \
                  "os.execvp(sys.argv[3], sys.argv[3:])"


def _above_fd_4(fd: int) -> int:
    """The same pipe end on a descriptor that moving the pipes onto fds 3 and 4 cannot overwrite."""
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return moved


class DevTools:
    """Headless Chromium driven over --remote-debugging-pipe (NUL-terminated JSON on fds 3 and 4)."""

    def __init__(self, binary: str, profile: Path):
        profile.mkdir(parents=True, exist_ok=True)
        self._log = open(profile / "chromium.log", "w+b")  # a file, so a chatty browser never blocks on a pipe
        to_browser_r, self._to_browser = map(_above_fd_4, os.pipe())
        self._from_browser, from_browser_w = map(_above_fd_4, os.pipe())
        flags = ["--headless", "--disable-gpu", "--no-sandbox", "--no-first-run", "--no-default-browser-check",
                 "--disable-extensions", "--disable-background-networking", "--hide-scrollbars",
                 "--remote-debugging-pipe", f"--user-data-dir={profile}"]
        # The browser reads commands from fd 3 and writes replies to fd 4; a tiny trampoline puts the pipes there.
        self.process = subprocess.Popen(
            [sys.executable, "-c", _ON_FDS_3_AND_4, str(to_browser_r), str(from_browser_w), binary, *flags],
            pass_fds=(to_browser_r, from_browser_w), stdout=subprocess.DEVNULL, stderr=self._log)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer, self._next_id, self.events = b"", 0, []

    def call(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        reply = self._wait(lambda m: m.get("id") == self._next_id, timeout, method)
        if "error" in reply:
            raise RuntimeError(f"{method}: {reply['error']}")
        return reply["result"]

    def wait_for_event(self, method: str, timeout: float = 30) -> dict:
        return self._wait(lambda m: m.get("method") == method, timeout, method)

    def _wait(self, matches, timeout: float, what: str) -> dict:
        for event in self.events:
            if matches(event):
                return event
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" in self._buffer:
                raw, self._buffer = self._buffer.split(b"\0", 1)
                message = json.loads(raw)
                if "id" not in message:
                    self.events.append(message)
                if matches(message):
                    return message
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self._from_browser], [], [], remaining)[0]:
                raise TimeoutError(f"Chromium did not answer {what} within {timeout}s")
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                self._log.seek(0)
                raise RuntimeError(f"Chromium exited: {self._log.read().decode(errors='replace')[-2000:]}")
            self._buffer += chunk

    def close(self):
        try:
            self.call("Browser.close", timeout=10)
        except (RuntimeError, TimeoutError, OSError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._to_browser)
        os.close(self._from_browser)
        self._log.close()


PAGE_FACTS = """JSON.stringify({
  images: document.images.length,
  decoded: Array.from(document.images).filter(i => i.complete && i.naturalWidth === 32).length,
  scripts: document.scripts.length,
  text: document.body.innerText,
  firstImage: (() => { const r = document.images[0].getBoundingClientRect();
                       return [r.left, r.top, r.width, r.height]; })(),
})"""


def open_in_chromium(html_file: Path, profile: Path, width: int = 1280, height: int = 2000) -> dict:
    """Load the file; return the page facts, the screenshot and every error or network request seen."""
    browser = DevTools(chromium_binary(), profile)
    try:
        target = browser.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            browser.call(f"{domain}.enable", session=session)
        browser.call("Emulation.setDeviceMetricsOverride",
                     {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False}, session=session)
        browser.call("Page.navigate", {"url": html_file.as_uri()}, session=session)
        browser.wait_for_event("Page.loadEventFired")
        facts = json.loads(browser.call("Runtime.evaluate", {"expression": PAGE_FACTS, "returnByValue": True},
                                        session=session)["result"]["value"])
        shot = base64.b64decode(browser.call("Page.captureScreenshot", {"format": "png"}, session=session)["data"])
    finally:
        browser.close()
    return {"facts": facts, "screenshot": Image.open(io.BytesIO(shot)).convert("RGB"),
            "problems": page_problems(browser.events)}


def page_problems(events: list[dict]) -> list[str]:
    problems = []
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.exceptionThrown":
            problems.append(f"exception: {params['exceptionDetails'].get('text')}")
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "warning", "assert"):
            problems.append(f"console.{params['type']}: {params.get('args')}")
        elif method == "Log.entryAdded" and params["entry"]["level"] in ("error", "warning"):
            problems.append(f"log {params['entry']['level']}: {params['entry'].get('text')}")
        elif method == "Network.loadingFailed":
            problems.append(f"failed load: {params.get('errorText') or params.get('blockedReason')}")
        elif method == "Network.requestWillBeSent":
            url = params["request"]["url"]
            if not url.startswith(("file:", "data:")):
                problems.append(f"network request: {url[:80]}")
    return problems


def colourful_pixels(image: Image.Image) -> int:
    saturation = image.convert("HSV").getchannel("S")
    return sum(saturation.point(lambda s: 255 if s > 100 else 0).histogram()[255:])


def test_report_renders_in_headless_chromium_without_errors(data, evidence_dir, tmp_path):
    html_file = tmp_path / "report.html"
    html_file.write_text(render_html(data, evidence_dir), encoding="utf-8")
    seen = open_in_chromium(html_file, tmp_path / "profile")

    assert seen["problems"] == []
    facts = seen["facts"]
    assert facts["scripts"] == 0
    assert facts["images"] == facts["decoded"] == 2 * sample_count(data)
    assert XSS_SCRIPT in facts["text"] and XSS_ATTRIBUTE in facts["text"]
    assert "FAIL: leakage over threshold (exit 10)" in facts["text"]

    shot = seen["screenshot"]
    assert shot.size == (1280, 2000)
    assert ImageStat.Stat(shot.convert("L")).var[0] > 100, "the screenshot is blank"
    left, top, width, height = facts["firstImage"]
    assert top + height < 2000, "the first evidence image should be on the first screen"
    thumbnail = shot.crop((int(left) + 2, int(top) + 2, int(left + width) - 2, int(top + height) - 2))
    assert ImageStat.Stat(thumbnail.convert("L")).var[0] > 100, "the evidence image is not drawn"
    assert colourful_pixels(thumbnail) > 0.2 * thumbnail.width * thumbnail.height


def test_browser_check_notices_remote_loads_and_scripts(data, evidence_dir, tmp_path):
    hostile = '<img src="https://example.invalid/tracker.png"><script>console.error("ran")</script>'
    html_file = tmp_path / "tampered.html"
    html_file.write_text(render_html(data, evidence_dir).replace("<body>", "<body>" + hostile, 1), encoding="utf-8")
    problems = " ".join(open_in_chromium(html_file, tmp_path / "profile")["problems"])
    assert "https://example.invalid/tracker.png" in problems
    assert "inline script" in problems


def test_report_shows_the_evidence_rules_power_substitution_and_collateral_groups(data, evidence_dir):
    data = copy.deepcopy(data)
    data["evidence_rules"] = {"required": ["canonical", "paraphrase", "collateral", "keep", "attack"], "confidence": 0.95,
                              "max_images": 64, "images_per_round": 2, "assumed_icc": 0.2, "min_elicitation": 0.5,
                              "min_collateral_retention": 0.9, "max_substitution": 0.5, "operator": "retain_projection",
                              "threat_model": "text"}
    target = data["concepts"][0]["probes"][0]
    target.update(assessment="uninformative", status="unassessed", power=0.25, error="uninformative: only 0.25",
                  substitution={"labels": {"Piet Mondrian": 12, "plain": 4}, "into_protected": 12, "rate": 0.75,
                                "threshold": 0.5, "status": "fail"})
    groups = [{"group": "Albert Einstein", "category": "person", "status": "fail", "retention": 0.0, "retention_low": 0.0,
               "retention_high": 0.1, "edited": {"n": 8, "rate": 0.0}, "original": {"n": 8, "rate": 1.0}},
              {"group": "a cup", "category": "object", "status": "consistent", "retention": 1.0, "retention_low": 0.8,
               "retention_high": 1.2, "edited": {"n": 8, "rate": 1.0}, "original": {"n": 8, "rate": 1.0}}]
    data["concepts"].append({"name": "Outside the policy", "category": "collateral", "verdict": "fail", "probes": [
        {"probe": "collateral", "kind": "keep", "status": "fail", "n": 16, "hits": 8, "rate": 0.5, "ci_low": 0.2,
         "ci_high": 0.8, "threshold": 0.9, "retention": 0.5, "retention_low": 0.2, "retention_high": 0.8,
         "groups": groups, "error": "Albert Einstein: retention 0.00 is below 0.90", "samples": []}]})
    text = " ".join(Page(render_html(data, evidence_dir)).body_text.split())
    assert "How this verdict is reached" in text and "canonical, paraphrase, collateral, keep, attack" in text
    assert "This edit reduces to a projection onto the retain span" in text
    assert "UNINFORMATIVE" in text and "Piet Mondrian 12" in text
    assert "Albert Einstein" in text and "CONSISTENT" in text and "Outside the policy" in text
    assert "Failed because" in text and "Albert Einstein: retention 0.00 is below 0.90" in text
    assert "Threat model: text" in text and "attacks that need the weights (embedding-space) are shown and not gated" in text


def test_hardening_rounds_and_the_stored_benchmark_have_their_sections(data, evidence_dir):
    data["hardening"] = {"rounds": [
        {"round": 1, "attacks": {"Pikachu": [{"attack": "soft_prompt", "seed": 60000, "loss_ratio": 0.8}]},
         "rows_added_per_layer": 24, "removed_by_previous_edit": {"a": 0.1, "b": 0.3},
         "removed_by_this_edit": {"a": 0.5, "b": 0.7}},
        {"round": 2, "attacks": {"Pikachu": [{"attack": "soft_prompt", "seed": 70000, "loss_ratio": 1.2}]},
         "stopped": "every attack at or above stop_ratio"}]}
    data["benchmark"] = {"command": "python bench/erasure.py", "generated_at": "2026-12-02 07:00 UTC",
                         "svg": '<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><circle r="4"/></svg>',
                         "pareto_front": [{"eraser": "UCE (faithful)", "retain": "neighbours", "erasure": 0.22,
                                           "collateral": 1.0}],
                         "columns": ["policy", "eraser", "HM"], "rows": [["demo", "UCE (faithful)", "0.53"]]}
    html = render_html(data, evidence_dir)
    text = Page(html).body_text
    assert "Hardening rounds" in text and "0.200 → 0.600" in text and "every attack at or above stop_ratio" in text
    assert "Benchmark of this model's erasers" in text and "UCE (faithful) (retain neighbours): erasure 0.22" in text
    assert '<circle r="4"/>' in html  # the stored plot is inlined as SVG, not escaped


def test_report_has_no_hardening_or_benchmark_section_without_them(data, evidence_dir):
    text = Page(render_html(data, evidence_dir)).body_text
    assert "Hardening rounds" not in text and "Benchmark of this model's erasers" not in text
