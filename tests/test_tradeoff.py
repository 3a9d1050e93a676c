"""The recipe trade-off page: results files read (newest per recipe, malformed ones skipped), one
SVG point per row with its data attributes, a self-contained page, and the chart as headless
Chromium renders it (a screenshot to $LQC_SCREENSHOT_DIR when set, else next to the page)."""

from __future__ import annotations

import json
import os
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest

from lqc.tradeoff import load_results, main, write_tradeoff_page

from .browser import chromium, require_browser


def _result(recipe: str, weight_bytes: int, delta: float, decode: float, **extra) -> dict:
    return {"model": "smollm2-135m", "recipe": recipe, "kind": "recipe", "weight_bytes": weight_bytes,
            "fp32_weight_bytes": 538_100_000, "ppl": 23.63 * (1 + delta / 100), "ppl_reference": 23.63,
            "ppl_delta_pct": delta, "windows": 16, "decode_tokens_per_s": decode, "baseline": "inductor-bf16",
            "baseline_decode_tokens_per_s": 53.0, "kv_bytes_per_token": 46080,
            "measured_at": "2026-12-06T03:00:00", "command": "make demo", **extra}


def _write(folder: Path, name: str, data) -> Path:
    path = folder / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


@pytest.fixture
def results(tmp_path) -> Path:
    folder = tmp_path / "results"
    folder.mkdir()
    _write(folder, "fp32.json", _result("float32 eager", 538_100_000, 0.0, 20.5, kind="baseline"))
    _write(folder, "bf16.json", _result("inductor bf16", 269_050_000, 0.1, 53.0, kind="baseline"))
    _write(folder, "default-old.json", _result("default", 140_000_000, 1.9, 70.0, measured_at="2026-12-05T22:00:00"))
    _write(folder, "default-new.json", _result("default", 135_200_000, 0.7, 80.1))
    _write(folder, "max.json", _result("max <int4 & kv8>", 90_000_000, 6.2, 110.0))
    # no measured_at on either: the later file wins
    old = _write(folder, "int8-a.json", _result("int8", 270_000_000, 0.2, 40.0, measured_at=None))
    _write(folder, "int8-b.json", _result("int8", 269_000_000, 0.1, 45.0, measured_at=None))
    os.utime(old, (1_000_000, 1_000_000))
    # malformed: not JSON, not a dict, a required key missing, a weight that is not a number, not *.json
    _write(folder, "broken.json", "{not json")
    _write(folder, "list.json", [1, 2, 3])
    _write(folder, "no-decode.json", {k: v for k, v in _result("nodecode", 1, 0.0, 1.0).items() if k != "decode_tokens_per_s"})
    _write(folder, "string-weight.json", _result("stringweight", "135 MB", 0.0, 1.0))  # type: ignore[arg-type]
    _write(folder, "notes.txt", json.dumps(_result("txt", 1, 0.0, 1.0)))
    return folder


class _Points(HTMLParser):
    """The chart's point groups (their attributes) and labels, and every src / href and script tag."""

    def __init__(self):
        super().__init__()
        self.points, self.labels, self.links, self.scripts, self._in_label = [], [], [], [], False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "g" and "point" in (attrs.get("class") or "").split():
            self.points.append(attrs)
        self._in_label = tag == "text" and attrs.get("class") == "label"
        self.links += [v for k, v in attrs.items() if k in ("src", "href", "xlink:href")]
        if tag == "script":
            self.scripts.append(attrs)

    def handle_data(self, data):
        if self._in_label:
            self.labels.append(data)
            self._in_label = False


def test_load_results_keeps_the_newest_per_recipe_and_skips_malformed_files(results):
    rows = load_results(results)
    by_recipe = {r["recipe"]: r for r in rows}
    assert len(rows) == len(by_recipe) == 5
    assert set(by_recipe) == {"float32 eager", "inductor bf16", "default", "max <int4 & kv8>", "int8"}
    assert by_recipe["default"]["measured_at"] == "2026-12-06T03:00:00" and by_recipe["default"]["ppl_delta_pct"] == 0.7
    assert by_recipe["int8"]["decode_tokens_per_s"] == 45.0  # same measured_at (none): the newer file
    assert [r["kind"] for r in rows[:2]] == ["baseline", "baseline"]  # largest weights first
    # the same recipe on another model is another row
    _write(results, "other-model.json", _result("default", 60_000_000, 1.0, 150.0, model="tiny-llama"))
    assert sorted((r["model"], r["recipe"]) for r in load_results(results) if r["recipe"] == "default") == [
        ("smollm2-135m", "default"), ("tiny-llama", "default")]
    assert load_results(results / "missing") == []


def test_page_has_one_point_per_row_and_is_self_contained(results, tmp_path):
    rows = load_results(results)
    page = write_tradeoff_page(rows, tmp_path / "page" / "tradeoff.html", title="SmolLM2 <recipes>")
    text = page.read_text()
    parser = _Points()
    parser.feed(text)
    assert len(parser.points) == len(rows)
    for point, row in zip(parser.points, rows):
        assert point["data-recipe"] == row["recipe"]  # html.unescape'd by the parser: escaped in the file
        assert float(point["data-weight-mb"]) == pytest.approx(row["weight_bytes"] / 1e6)
        assert float(point["data-ppl-delta"]) == pytest.approx(row["ppl_delta_pct"])
        assert float(point["data-decode"]) == pytest.approx(row["decode_tokens_per_s"])
        assert ("baseline" in point["class"].split()) == (row["kind"] == "baseline")
    assert parser.labels == [r["recipe"] for r in rows]
    assert text.count("<title>") == 1 + len(rows)  # the page's, then one tooltip per point
    # escaped everywhere, self-contained: no scripts, nothing fetched
    assert "max <int4" not in text and "max &lt;int4 &amp; kv8&gt;" in text and "SmolLM2 &lt;recipes&gt;" in text
    assert not parser.scripts and "<script" not in text.lower()
    assert not [link for link in parser.links if not link.startswith("#") and not link.startswith("url(#")]
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", text, flags=re.I)
    assert "@import" not in text and "url(http" not in text
    # the table: one row per result, the ratios worked out
    assert text.count("<tr>") == 1 + len(rows)
    assert "0.251×" in text and "1.51× inductor-bf16" in text and "46,080" in text


def test_empty_page_says_how_to_produce_results(tmp_path, capsys):
    page = write_tradeoff_page([], tmp_path / "empty.html", title="trade-off")
    text = page.read_text()
    assert "No results yet" in text and "make demo" in text and "<svg" not in text
    # the command-line entry: an empty folder gives the same page, and prints the path it wrote
    (tmp_path / "none").mkdir()
    assert main([str(tmp_path / "none"), str(tmp_path / "cli.html")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "cli.html")
    assert "No results yet" in (tmp_path / "cli.html").read_text()


def test_page_renders_in_chromium(results, tmp_path):
    require_browser()
    from selenium.webdriver.common.by import By

    rows = load_results(results)
    page = write_tradeoff_page(rows, tmp_path / "tradeoff.html", title="SmolLM2-135M: recipe trade-off")
    with chromium() as driver:
        driver.get(page.as_uri())
        assert driver.find_element(By.TAG_NAME, "h1").text == "SmolLM2-135M: recipe trade-off"
        assert not [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
        points = driver.find_elements(By.CSS_SELECTOR, "svg#chart g.point")
        assert len(points) == len(rows)
        boxes = driver.execute_script(
            "return [...document.querySelectorAll('svg#chart g.point .marker')].map(m => {"
            " const r = m.getBoundingClientRect(); return [r.width, r.height, r.x, r.y]; })")
        assert len(boxes) == len(rows) and all(w > 0 and h > 0 for w, h, _, _ in boxes)
        svg = driver.find_element(By.CSS_SELECTOR, "svg#chart").rect
        for _, _, x, y in boxes:  # inside the chart
            assert svg["x"] <= x <= svg["x"] + svg["width"] and svg["y"] <= y <= svg["y"] + svg["height"]
        # smaller weights to the left, larger perplexity change higher up (smaller y)
        centre = {p.get_attribute("data-recipe"): p.find_element(By.CSS_SELECTOR, ".marker").rect for p in points}
        assert centre["max <int4 & kv8>"]["x"] < centre["default"]["x"] < centre["float32 eager"]["x"]
        assert centre["max <int4 & kv8>"]["y"] < centre["default"]["y"] < centre["float32 eager"]["y"]
        assert [p.find_element(By.CSS_SELECTOR, "text.label").text for p in points] == [r["recipe"] for r in rows]
        labels = [p.find_element(By.CSS_SELECTOR, "text.label").rect for p in points]
        for i, a in enumerate(labels):  # labels of points at the same place do not overlap
            for b in labels[i + 1:]:
                assert (a["x"] + a["width"] <= b["x"] or b["x"] + b["width"] <= a["x"]
                        or a["y"] + a["height"] <= b["y"] or b["y"] + b["height"] <= a["y"])
        markers = [p.find_element(By.CSS_SELECTOR, ".marker").tag_name for p in points]
        assert markers == ["rect" if r["kind"] == "baseline" else "circle" for r in rows]
        assert len(driver.find_elements(By.CSS_SELECTOR, "table#results tbody tr")) == len(rows)
        folder = Path(os.environ.get("LQC_SCREENSHOT_DIR", tmp_path))
        folder.mkdir(parents=True, exist_ok=True)
        shot = folder / "tradeoff.png"
        assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
