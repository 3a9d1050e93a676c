"""The viz report in headless Chromium: the timeline renders, changed nodes are highlighted, a
decoder block expands, search finds a node. Each test saves a screenshot (to
$LQC_SCREENSHOT_DIR when set, else next to the report)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import lqc
import lqc.viz

from .browser import chromium, require_browser

WAIT_SECONDS = 30


def _screenshot(driver, report: Path, name: str) -> Path:
    folder = Path(os.environ.get("LQC_SCREENSHOT_DIR", report.parent))
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    assert driver.save_screenshot(str(path))
    assert path.stat().st_size > 10_000  # a rendered page, not a blank one
    return path


def _open(driver, page: Path):
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(page.as_uri())
    WebDriverWait(driver, WAIT_SECONDS).until(lambda d: d.execute_script("return document.body.dataset.ready") == "1")
    assert not [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def _wait_for(driver, css: str):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT_SECONDS).until(lambda d: d.find_elements(By.CSS_SELECTOR, css))


def test_report_in_chromium(tiny_llama, token_ids, tmp_path):
    require_browser()
    from selenium.webdriver.common.by import By

    (report,) = lqc.viz.compressed_reports(tiny_llama, "int8", calibration=None, example_inputs=token_ids)
    page = lqc.viz.write_html([report], tmp_path / "report.html", title="lqc: tiny Llama, recipe int8")
    record = report.records[-1]  # the page opens on the graph that runs: after the lowering
    assert (record.name, record.stage) == ("pack_cpu_layouts", "lowering")
    with chromium() as driver:
        _open(driver, page)
        # the pass timeline renders, the last pass selected
        steps = driver.find_elements(By.CSS_SELECTOR, "#timeline .pass-step")
        assert [s.get_attribute("data-pass") for s in steps] == ["capture", "cleanup", "quantize", "pack_cpu_layouts"]
        assert "(lowering)" in steps[-1].text
        assert "active" in steps[-1].get_attribute("class")
        assert f"+{len(record.nodes_added)}" in steps[-1].text and f"−{len(record.nodes_removed)}" in steps[-1].text

        # blocks start collapsed, marked as changed; one click expands block 1 in both panes
        block = driver.find_element(By.CSS_SELECTOR, '#pane-after [data-group="model.layers.1"]')
        assert "has-changes" in block.get_attribute("class")
        assert not driver.find_elements(By.CSS_SELECTOR, '#pane-after [data-cluster="model.layers.1"]')
        block.click()
        _wait_for(driver, '#pane-after [data-cluster="model.layers.1"]')
        for child in ("self_attn", "mlp"):
            assert driver.find_elements(By.CSS_SELECTOR, f'#pane-after [data-cluster="model.layers.1.{child}"]')
        assert driver.find_elements(By.CSS_SELECTOR, '#pane-before [data-cluster="model.layers.1"]')

        # inside it, the MLP folds into one box and unfolds again
        driver.find_element(By.CSS_SELECTOR, '#pane-after .cluster.foldable[data-cluster="model.layers.1.mlp"] text').click()
        folded = _wait_for(driver, '#pane-after [data-child="model.layers.1.mlp"]')
        assert not driver.find_elements(By.CSS_SELECTOR, '#pane-after [data-cluster="model.layers.1.mlp"]')
        assert driver.find_elements(By.CSS_SELECTOR, '#pane-after [data-cluster="model.layers.1.self_attn"]')
        folded[0].click()
        _wait_for(driver, '#pane-after [data-cluster="model.layers.1.mlp"]')

        # the nodes the lowering added (packed qlinears) are highlighted after it, the ones it removed before it
        added = driver.find_elements(By.CSS_SELECTOR, "#pane-after .box.added")
        added_names = {e.get_attribute("data-node") for e in added}
        assert added_names and added_names <= set(record.nodes_added)
        assert {e.text for e in added} == {"qlinear"}
        stroke = driver.execute_script("return getComputedStyle(arguments[0].querySelector('rect')).stroke", added[0])
        assert stroke == "rgb(46, 157, 75)"  # the 'added' green, not the plain box's grey
        removed = driver.find_elements(By.CSS_SELECTOR, "#pane-before .box.removed")
        assert removed and {e.get_attribute("data-node") for e in removed} <= set(record.nodes_removed)
        assert driver.find_elements(By.CSS_SELECTOR, "#pane-after .box.changed")  # rewired readers
        _screenshot(driver, page, "viz-expanded-block.png")

        # search finds a node of the other block, expands that block and selects the node
        target = next(n for n in record.nodes_added if n.startswith("qlinear"))
        hits_before = driver.find_elements(By.CSS_SELECTOR, '#pane-after [data-node="%s"]' % target)
        search = driver.find_element(By.ID, "search")
        search.send_keys(target)
        hits = _wait_for(driver, "#search-results .hit")
        assert hits[0].get_attribute("data-node") == target
        hits[0].click()
        selected = _wait_for(driver, f'#pane-after .box.selected[data-node="{target}"]')
        assert selected and "added" in selected[0].get_attribute("class")
        panel = driver.find_element(By.ID, "panel-body").text
        assert f"%{target}" in panel and "pack_cpu_layouts, from" in panel and "added by this pass" in panel
        kernel = report.kernels[target]  # its fusion group (the partitioner's), and the group's kernel template
        assert f"fusion group {kernel['group']} (qlinear on %{target})" in panel and kernel["template"] in panel
        # the kernel target="triton" generates for the group: its source, folded until clicked
        summary = driver.find_element(By.CSS_SELECTOR, "#panel-body .kernel-source summary")
        assert summary.text == f"generated kernel {kernel['source']}"
        summary.click()
        assert "@triton.jit" in driver.find_element(By.CSS_SELECTOR, "#panel-body .kernel-source pre").text
        assert "dB SQNR" in panel or "exact" in panel
        if not hits_before:  # it was in the collapsed block: search expanded it
            assert driver.find_elements(By.CSS_SELECTOR, "#pane-after [data-cluster]")

        # the error overlay colours nodes of the final graph
        driver.find_element(By.ID, "overlay").click()
        coloured = driver.execute_script(
            "return [...document.querySelectorAll('#pane-after .box rect')].filter(r => r.style.fill).length"
        )
        assert coloured > 10
        _screenshot(driver, page, "viz-search-overlay.png")


@pytest.mark.slow
@pytest.mark.real_model
def test_smollm2_report_is_small_and_usable(smollm2, tmp_path):
    """The 30-layer model (about 2,000 nodes): the page stays under 20 MB, opens collapsed (one box
    per decoder block), a block expands, search reaches a node in another block."""
    torch._dynamo.reset()
    (report,) = lqc.viz.compressed_reports(smollm2.model, "int8", calibration="calib", tokenizer=smollm2.tokenizer)
    page = lqc.viz.write_html([report], tmp_path / "smollm2.html", title="lqc: SmolLM2-135M, recipe int8")
    assert len(report.snapshots[0]["nodes"]) > 1500
    assert page.stat().st_size < 20_000_000
    require_browser()
    from selenium.webdriver.common.by import By

    with chromium() as driver:
        _open(driver, page)
        blocks = driver.find_elements(By.CSS_SELECTOR, "#pane-after [data-group^='model.layers.']")
        assert len(blocks) == 30
        assert len(driver.find_elements(By.CSS_SELECTOR, "#pane-after [data-node]")) < 60  # collapsed by default
        driver.find_element(By.CSS_SELECTOR, '#pane-after [data-group="model.layers.29"]').click()
        _wait_for(driver, '#pane-after [data-cluster="model.layers.29.mlp"]')
        search = driver.find_element(By.ID, "search")
        search.send_keys("model.layers.17.mlp")
        hits = _wait_for(driver, "#search-results .hit")
        hits[0].click()
        _wait_for(driver, '#pane-after [data-cluster="model.layers.17"]')
        assert driver.find_elements(By.CSS_SELECTOR, "#pane-after .box.selected")
        _screenshot(driver, page, "viz-smollm2.png")
