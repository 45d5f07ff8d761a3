"""report.html in a real browser: headless Chromium (Debian: `apt-get install -y chromium`).

One load takes a screenshot with console logging on (no console errors allowed); a second loads a
copy with a probe script that writes each image's decoded and laid-out size into the DOM, read
back with --dump-dom. The report itself has no scripts.
"""

import re
import shutil
import subprocess

import pytest
from matplotlib.image import imread

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install -y chromium)")

PROBE = """<script>window.addEventListener("load", () => {
  const rows = [...document.images].map(im => { const r = im.getBoundingClientRect();
    return `${im.id} ${im.naturalWidth} ${im.naturalHeight} ${Math.round(r.width)} ${Math.round(r.height)}`; });
  const pre = document.createElement("pre"); pre.id = "img-sizes"; pre.textContent = rows.join("\\n");
  document.body.appendChild(pre); });</script>"""


def chromium(tmp_path, *args):
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,3000"]
    return subprocess.run([CHROMIUM, *flags, *args], capture_output=True, text=True, timeout=120)


def test_report_renders_in_chromium(reported_run, tmp_path):
    html = reported_run / "report.html"
    shot = tmp_path / "shot.png"
    res = chromium(tmp_path, "--enable-logging=stderr", "--v=0", f"--screenshot={shot}", html.resolve().as_uri())
    assert res.returncode == 0, res.stderr[-2000:]
    console = [line for line in res.stderr.splitlines() if ":CONSOLE" in line or "Uncaught" in line]
    assert console == []
    pixels = imread(shot)
    assert pixels.shape[:2] == (3000, 1200) and pixels.std() > 0.05  # not a blank page

    probe = reported_run / "probe.html"
    probe.write_text(html.read_text().replace("</body>", PROBE + "</body>"))
    try:
        res = chromium(tmp_path, "--dump-dom", probe.resolve().as_uri())
    finally:
        probe.unlink()
    m = re.search(r'<pre id="img-sizes">(.*?)</pre>', res.stdout, re.S)
    assert m, res.stderr[-2000:]
    sizes = {row.split()[0]: [int(v) for v in row.split()[1:]] for row in m.group(1).splitlines()}
    for fig in ("routing-heatmap", "usage-chart", "training-curves", "confusion-moe"):
        nat_w, nat_h, w, h = sizes[fig]
        assert min(nat_w, nat_h, w, h) > 50, (fig, sizes[fig])
