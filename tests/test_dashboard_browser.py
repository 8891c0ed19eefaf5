"""The feature browser in a real browser: headless Chromium (Debian's `chromium`) over the DevTools protocol.

One tiny project runs the real pipeline once for the module (capture, SAE training, the feature pass),
with a hostile class name and feature label written in afterwards; the site is built, served on a free
localhost port and every page type is loaded, clicked and screenshotted. Set TIDE_DASHBOARD_SHOTS=DIR
to keep the screenshots (docs/img holds a few from the default run).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path
from urllib.parse import urljoin, urlparse

import numpy as np
import pytest

from dashboards import server
from dashboards.browser import READY_JS, Browser, find_chromium
from tests.conftest import merge, quiet, write_config

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parent.parent
EVIL = '<img src=x onerror="alert(1)"><script>alert(2)</script>&amp;'
CFG = {"sae": {"train": {"total_tokens": 6000}, "eval_tokens": 2000, "splice_samples": 0,
               "variants": ["tide", "topk"]},
       "features": {"top_n": 4, "neighbors": 3}}


def chromium() -> str:
    """The system Chromium; installed through scripts/install_chromium.sh when missing."""
    found = find_chromium()
    if not found:
        subprocess.run(["bash", str(REPO / "scripts" / "install_chromium.sh")], timeout=600, check=False)
        found = find_chromium()
    if not found:
        pytest.skip("Chromium is not installed and scripts/install_chromium.sh could not install it "
                    "(needs root or passwordless sudo and apt-get); set TIDE_CHROMIUM to a Chrome/Chromium binary")
    return found


@pytest.fixture(scope="module")
def project(tiny_model_dir, tmp_path_factory):
    """The tiny project after capture, SAE training (layer 1) and the real feature pass, plus hostile text."""
    from pipelines.project import Project
    from pipelines.stages import capture, features, sae, samples, top_images
    from storage import Warehouse

    d = tmp_path_factory.mktemp("dash")
    project = Project.load(write_config(d, merge({"model": {"digits": {"checkpoint_dir": str(tiny_model_dir / "dit")}}},
                                                 CFG)))
    shutil.copytree(tiny_model_dir / "warehouse" / "judge", project.root / "judge")
    ctx = quiet(project)
    capture.create_store(ctx)
    for shard in range(project.num_shards):
        capture.write_shard(ctx, shard)
    samples.publish_samples(ctx)
    sae.train_layer(ctx, 1, "resid")
    features.build_feature_stats(ctx, 1, "resid")
    top_images.build_top_images(ctx, 1, "resid")

    wh = Warehouse(project.duckdb_path)
    samples = wh.query("SELECT * FROM samples").to_pylist()
    for r in samples:
        if r["class_id"] == 3:
            r["class_name"] = EVIL
    wh.replace_partition("samples", {"run_id": samples[0]["run_id"]}, samples)
    tide = wh.query("SELECT sae_id FROM saes WHERE variant = 'tide'").column(0)[0].as_py()
    feats = wh.query("SELECT * FROM features WHERE sae_id = ? ORDER BY feature_id", [tide]).to_pylist()
    feats[max(feats, key=lambda r: r["fire_rate"] or 0)["feature_id"]]["label"] = EVIL  # the busiest feature
    wh.replace_partition("features", {"sae_id": tide}, feats)
    return project


@pytest.fixture(scope="module")
def labelled(project) -> int:
    """The feature carrying the hostile label."""
    from storage import Warehouse

    return Warehouse(project.duckdb_path).query("SELECT feature_id FROM features WHERE label = ?", [EVIL]).column(0)[0].as_py()


@pytest.fixture(scope="module")
def site(project):
    from pipelines.stages.dashboard import build_dashboard

    report = build_dashboard(quiet(project))
    assert report.n_features == 128 and report.n_images == 24 and not report.warnings
    return report


@pytest.fixture(scope="module")
def served(site):
    with server.start(site.out_dir) as srv:
        yield srv


@pytest.fixture(scope="module")
def browser():
    with Browser(chromium(), width=1280, height=900) as b:
        yield b


@pytest.fixture(scope="module")
def saes(site):
    return json.loads((site.out_dir / "data" / "site.json").read_text())["saes"]


def load(browser: Browser, url: str) -> None:
    """Navigate, wait for the page to render, and demand a clean console and decoded images."""
    before = len(browser.errors)
    browser.goto("about:blank", ready_js="true")  # a URL differing only in #hash would not reload
    state = browser.goto(url)
    text = browser.evaluate("document.getElementById('main').innerText.slice(0, 300)")
    assert state == "1", f"{url} did not render: {text}"
    browser.wait_for("[...document.images].every(i => i.complete)")
    broken = browser.evaluate("[...document.images].filter(i => !(i.naturalWidth > 0)).map(i => i.src)")
    assert not broken, f"{url}: images that did not decode: {broken[:5]}"
    assert browser.errors[before:] == [], f"{url}: console errors {browser.errors[before:]}"


def shot(browser: Browser, name: str) -> np.ndarray:
    """Screenshot (kept under $TIDE_DASHBOARD_SHOTS if set) as a grey array; fails if it is blank."""
    from PIL import Image

    png = browser.screenshot()
    keep = os.environ.get("TIDE_DASHBOARD_SHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        (Path(keep) / f"dashboard_{name}.png").write_bytes(png)
    grey = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float32)
    assert grey.std() > 10 and len(np.unique(grey)) > 30, f"{name} screenshot looks blank"
    return grey


def region_std(browser: Browser, grey: np.ndarray, selector: str) -> float:
    """Pixel spread of the screenshot inside the first element matching selector (page coordinates)."""
    box = browser.evaluate(f"(() => {{ const r = document.querySelector({json.dumps(selector)}).getBoundingClientRect();"
                           " return [r.left + scrollX, r.top + scrollY, r.width, r.height]; })()")
    x, y, w, h = (int(v) for v in box)
    return float(grey[y:y + h, x:x + w].std())


def follow(browser: Browser, selector: str) -> str:
    """Click a link and wait for the next page to render; returns its URL."""
    browser.evaluate("document.body.dataset.ready = ''")  # so the old page cannot answer for the new one
    browser.click(selector)
    assert browser.wait_for(READY_JS) == "1"
    return browser.evaluate("location.href")


def type_in(browser: Browser, selector: str, value: str) -> None:
    """Set a filter control and wait until the (debounced) list has re-rendered."""
    browser.fill(selector, value)
    browser.wait_for("!document.body.dataset.busy")


def rows(browser: Browser) -> list[int]:
    return browser.evaluate("[...document.querySelectorAll('#feature-table tbody tr')].map(r => +r.dataset.feature)")


# ------------------------------------------------------------------------------------------- tests


def test_every_page_type_renders_with_images_and_no_console_errors(browser, served, saes, labelled):
    tide = saes[0]
    pages = {
        "overview": "index.html",
        "features": f"sae.html?sae={tide['sae_id']}",
        "feature": f"feature.html?sae={tide['sae_id']}&f={labelled}",
        "sample": "sample.html?run={run}&s=3".format(run=tide["run_id"]),
    }
    for name, path in pages.items():
        load(browser, served.url + path)
        grey = shot(browser, name)
        if name in ("overview", "feature", "sample"):
            assert region_std(browser, grey, ".frame") > 5, f"{name}: the sample image is blank"
    # overview: one chart row per layer with a line per variant; the SAE table links every SAE
    load(browser, served.url)
    assert browser.evaluate("document.querySelectorAll('#plots svg.chart').length") == 3
    assert browser.evaluate("document.querySelectorAll('#plots polyline').length") == 6
    assert browser.evaluate("document.querySelectorAll('#sae-table tbody tr').length") == len(saes)
    # feature page: heatmaps painted over the top images, and they toggle off and back per scope
    load(browser, served.url + pages["feature"])
    painted = ("[...document.querySelectorAll('canvas.heat')].filter(c => c.getContext('2d')"
               ".getImageData(0, 0, c.width, c.height).data.some((v, i) => i % 4 === 3 && v > 0)).length")
    assert browser.evaluate(painted) == browser.evaluate("document.querySelectorAll('#tiles .tile').length") > 0
    browser.click("#heat-toggle")
    assert browser.evaluate("document.querySelectorAll('canvas.heat').length") == 0
    browser.click("#heat-toggle")
    browser.fill("#scope", "peak_step")
    steps = browser.evaluate("[...document.querySelectorAll('#tiles .caption')].map(c => c.innerText.split('\\n')[1])")
    assert len(set(steps)) == 1 and browser.evaluate(painted) > 0  # every image at the peak step
    assert browser.evaluate("document.querySelectorAll('svg.chart').length") >= 4  # curves, classes, histogram
    assert browser.evaluate("document.querySelectorAll('#neighbors tbody tr').length") == 3
    assert browser.evaluate("document.getElementById('steering')") is None  # no edits yet


def test_sorting_filtering_and_paging_change_what_is_shown(browser, served, saes):
    url = served.url + f"sae.html?sae={saes[0]['sae_id']}"
    load(browser, url)
    by_rate = rows(browser)
    assert len(by_rate) == 64
    browser.click("th[data-key=feature_id]")
    assert rows(browser)[:3] == [63, 62, 61]
    browser.click("th[data-key=feature_id]")
    assert rows(browser)[:3] == [0, 1, 2]
    browser.click("th[data-key=fire_rate]")
    desc = rows(browser)
    browser.click("th[data-key=fire_rate]")
    assert rows(browser) != desc and set(rows(browser)) == set(desc)
    type_in(browser, "#f-q", "7")
    assert rows(browser) == [7] and "filtered from 64" in browser.evaluate("document.getElementById('count').innerText")
    type_in(browser, "#f-q", "")
    type_in(browser, "#f-fr_min", "5")  # percent
    listing = json.loads(urllib.request.urlopen(served.url + f"data/sae/{saes[0]['slug']}/features.json").read())
    rates = dict(zip(listing["columns"]["feature_id"], listing["columns"]["fire_rate"], strict=True))
    assert sorted(rows(browser)) == sorted(f for f, r in rates.items() if r is not None and r * 100 >= 5)
    type_in(browser, "#f-fr_min", "")
    type_in(browser, "#f-cls", "3")
    classes = dict(zip(listing["columns"]["feature_id"], listing["columns"]["top_class"], strict=True))
    assert sorted(rows(browser)) == sorted(f for f, c in classes.items() if c == 3)
    assert browser.evaluate("[...document.querySelectorAll('#feature-table tbody td:nth-child(8)')]"
                            ".every(td => td.textContent === " + json.dumps(EVIL) + ")")
    # the filter lives in the URL: a reload (or a shared link) shows the same rows
    filtered, href = rows(browser), browser.evaluate("location.href")
    load(browser, href)
    assert rows(browser) == filtered and browser.evaluate("document.getElementById('f-cls').value") == "3"
    # paging
    load(browser, url)
    type_in(browser, "#f-size", "50")
    first = rows(browser)
    browser.click("#next")
    assert len(rows(browser)) == 14 and not set(rows(browser)) & set(first)


def test_links_between_features_saes_and_samples_resolve(browser, served, saes, labelled):
    tide = saes[0]
    start = [served.url, served.url + f"sae.html?sae={tide['sae_id']}",
             served.url + f"feature.html?sae={tide['sae_id']}&f={labelled}",
             served.url + f"sample.html?run={tide['run_id']}&s=3"]
    seen: dict[str, set[str]] = {}
    for page in start:
        load(browser, page)
        for href in browser.evaluate("[...document.querySelectorAll('a[href]')].map(a => a.href)"):
            u = urlparse(href)
            assert u.netloc == urlparse(served.url).netloc, f"{page} links off-site: {href}"
            seen.setdefault(u.path.rsplit("/", 1)[-1] or "index.html", set()).add(href.split("#")[0])
    assert {"index.html", "sae.html", "feature.html", "sample.html"} <= set(seen)
    for hrefs in seen.values():  # a few of every kind, in the browser (data fetched and rendered)
        for href in sorted(hrefs)[:4]:
            load(browser, href)
    load(browser, urljoin(served.url, f"feature.html?sae={tide['sae_id']}&f={labelled}"))
    assert "feature.html" in follow(browser, "#neighbors tbody a")
    assert "sample.html" in follow(browser, "#tiles a")
    assert browser.evaluate("document.querySelectorAll('#appearances a[href*=\"feature.html\"]').length") > 0


def test_hostile_text_is_shown_as_text_and_bad_ids_explain_themselves(browser, served, saes, labelled):
    tide = saes[0]
    load(browser, served.url + f"feature.html?sae={tide['sae_id']}&f={labelled}")
    assert browser.evaluate("document.getElementById('feature-label').textContent") == EVIL
    load(browser, served.url)
    assert EVIL in browser.evaluate("document.body.innerText")
    load(browser, served.url + f"sae.html?sae={tide['sae_id']}")
    assert browser.evaluate("document.querySelector('.label-pill').textContent") == EVIL
    assert browser.evaluate("document.querySelectorAll('img[src=x], script:not([src])').length") == 0
    assert not [m for m in browser.messages if m.level == "dialog"]
    for path, says in ((f"feature.html?sae={tide['sae_id']}&f=99999", "use an id in 0..63"),
                       ("feature.html?sae=%3Cb%3Enope", "unknown SAE \"<b>nope\""),
                       (f"sample.html?run={tide['run_id']}&s=9999", "has no sample 9999")):
        before = len(browser.errors)
        assert browser.goto(served.url + path) == "error"
        assert says in browser.evaluate("document.querySelector('.error').textContent")
        assert browser.evaluate("document.querySelectorAll('b').length") == 0
        assert browser.errors[before:] == []  # ids are checked before anything is fetched


def test_dashboard_command_and_asset(project, site, tmp_path):
    import dagster as dg

    from pipelines.definitions import build_definitions

    key = dg.AssetKey("feature_dashboard")
    job = build_definitions(str(project.config_path)).resolve_implicit_job_def_def_for_assets([key])
    result = job.execute_in_process(instance=dg.DagsterInstance.ephemeral(), asset_selection=[key])
    assert result.success
    md = result.asset_materializations_for_node("feature_dashboard")[0].metadata
    assert md["features"].value == 128 and md["layer01_nmse_by_step"].value.startswith("![")
    assert md["fire_rate_distribution"].value.startswith("![fire_rate_distribution](data:image/png;base64,")
    assert all(c.passed for c in result.get_asset_check_evaluations())
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "dashboard", "--config", str(project.config_path),
                             "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(60, proc.kill)  # a hung server fails the test instead of the suite
    watchdog.start()
    try:
        lines = []
        while not lines or ("feature dashboard on" not in lines[-1] and lines[-1]):  # a hint may come first
            lines.append(proc.stdout.readline())
        line = lines[-1]
        assert "feature dashboard on http://127.0.0.1:" in line, "".join(lines) + proc.stderr.read()
        url = line.split(" on ", 1)[1].split()[0]
        with urllib.request.urlopen(url + "data/site.json", timeout=10) as r:
            assert json.load(r)["saes"][0]["n_features"] == 64
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=10)
        watchdog.cancel()
    assert code == 0


def test_steering_preview_and_edits_page_appear_once_edits_exist(browser, served, project, labelled, saes):
    from dashboards.png import encode_png
    from pipelines.stages.dashboard import build_dashboard
    from storage import Warehouse

    tide = saes[0]
    rows = []
    for s in (3, 13):  # images where the edits asset writes them, named relative to the warehouse root
        for side, level in (("before", 40), ("after", 200)):
            path = project.root / "edits" / "e1" / f"{s}-{side}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(encode_png(np.full((16, 16, 1), level, np.uint8)))
        rows.append({"sample_id": s, "run_id": tide["run_id"], "sae_id": tide["sae_id"], "config_json": "{}",
                     "feature_ids": [labelled], "strength": 4.0, "step_start": 0, "step_end": 2, "pred_before": 3,
                     "conf_before": 0.9, "pred_after": 5, "conf_after": 0.6, "op": "add",
                     "image_before": f"edits/e1/{s}-before.png", "image_after": f"edits/e1/{s}-after.png"})
    rows[1]["image_after"] = "../../../etc/passwd"  # a path out of the warehouse is data, never followed
    wh = Warehouse(project.duckdb_path)
    wh.replace_partition("edits", {"edit_id": "e1"}, rows)
    by_concept = [r | {"config_json": json.dumps({"concept": "class:3"}), "concept": "3", "concept_before": False,
                       "concept_after": True, "image_before": None, "image_after": None} for r in rows]
    wh.replace_partition("edits", {"edit_id": "e2"}, by_concept)
    build_dashboard(quiet(project))  # swapped in under the running server
    site = json.loads((served.site_dir / "data" / "site.json").read_text())
    assert site["n_edits"] == 2 and any("not under" in w for w in site["warnings"])
    load(browser, served.url + f"feature.html?sae={tide['sae_id']}&f={labelled}")
    assert browser.evaluate("document.querySelectorAll('#steering tbody tr').length") == 4  # e1 and e2
    assert browser.evaluate("document.querySelectorAll('#steering img.big').length") == 3  # 2 before, 1 after
    shot(browser, "feature_steering")
    load(browser, served.url + "edits.html#e1")
    assert browser.evaluate("document.querySelectorAll('#e1 .edit-rows tbody tr').length") == 2
    srcs = browser.evaluate("[...document.querySelectorAll('#e1 img')].map(i => i.getAttribute('src'))")
    assert srcs == ["img/edits/e1/3-before.png", "img/edits/e1/3-after.png", "img/edits/e1/13-before.png"]
    assert "shows 3 before" not in browser.evaluate("document.getElementById('e1').textContent")
    assert "towards 3 (class)" in browser.evaluate("document.querySelector('#e2 h2').textContent")
    heads = browser.evaluate("[...document.querySelectorAll('#e2 thead th')].map(t => t.textContent)")
    assert heads[-2:] == ["shows 3 before", "after"]
    cells = browser.evaluate("[...document.querySelectorAll('#e2 tbody tr')].map(r => [...r.cells].slice(-2)"
                             ".map(c => c.textContent))")
    assert cells == [["no", "yes"], ["no", "yes"]]
    shot(browser, "edits")
    load(browser, served.url + "index.html")
    assert browser.evaluate("document.querySelector('a[href=\"edits.html\"]') !== null")
    load(browser, served.url + f"feature.html?sae={tide['sae_id']}&f={(labelled + 1) % 64}")
    assert browser.evaluate("document.getElementById('steering')") is None


def test_a_16k_feature_sae_stays_usable(browser, tmp_path):
    """16384 latents (synthetic rows): the list pages, sorts and searches client-side; a feature page
    fetches one small chunk file."""
    from test_dashboard import fill_synthetic

    from dashboards.site import build_site

    db = fill_synthetic(tmp_path, n_latents=16384, n_steps=2, top_n=1, variants=("tide",), label=None)
    site = build_site(db, log=lambda m: None).out_dir
    chunks = sorted((site / "data" / "sae").glob("*/f/*.json"))
    assert len(chunks) == 16384 // 16 and max(c.stat().st_size for c in chunks) < 200_000
    with server.start(site) as srv:
        sae = json.loads((site / "data" / "site.json").read_text())["saes"][0]["sae_id"]
        load(browser, srv.url + f"sae.html?sae={sae}")
        assert browser.evaluate("document.getElementById('count').innerText").startswith("1–100 of 16384 features")
        assert len(rows(browser)) == 100  # one page rendered, not 16k rows
        browser.click("th[data-key=feature_id]")
        assert rows(browser)[:2] == [16383, 16382]
        type_in(browser, "#f-q", "12345")
        assert rows(browser) == [12345]
        assert "feature.html" in follow(browser, "#feature-table tbody a")
        assert browser.evaluate("document.querySelector('h1').textContent").startswith("Feature #12345")
