"""The web demo: shape buckets share one compiled sampler; a request's checks, files and
sidecar (DemoSession, no web); and the real page (``python -m mmsr_jax.app`` on a tiny run made
here) driven in headless Chromium: upload, change controls, result at 4x with a matching
sidecar, a bad file's message, a second upload and two users at once."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import jax
import numpy as np
import pytest
import skimage.data
from PIL import Image

from mmsr_jax.data import images as image_io
from mmsr_jax.inference.super_resolver import SuperResolver
from mmsr_jax.inference.web_demo import DemoSession
from tests.conftest import save_random_run, small_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = 16  # LR pixels: every test image below pads to 16x16
STEPS = 4
SCREENSHOT = os.path.join(REPO, "docs", "app_screenshot.png")


def _image(path, h, w, seed, mode="RGB"):
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:h, 0:w]
  rgb = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1),
                  rng.integers(0, 256, (h, w))], -1).astype(np.uint8)
  Image.fromarray(rgb).convert(mode).save(path)
  return str(path)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """(workdir, SuperResolver on one device) of a saved run with random weights."""
  path = str(tmp_path_factory.mktemp("run"))
  trainer, state = save_random_run(path, small_config(), devices=jax.devices()[:1], seed=3)
  sr = SuperResolver(trainer.system, state.ema_params, trainer.frozen, step=1, workdir=path)
  return path, sr


def test_images_in_one_bucket_share_one_compiled_sampler(run):
  _, sr = run
  pics = [image_io.from_array(np.random.default_rng(i).integers(0, 256, (h, w, 3), np.uint8))
          for i, (h, w) in enumerate(((9, 11), (12, 10), (16, 16)))]
  outs = []
  for pic in pics:
    out, record = sr.upscale(pic, steps=STEPS, bucket=BUCKET)
    h, w = pic.size
    assert out.size == (4 * h, 4 * w) and record["output_size"] == [4 * h, 4 * w]
    assert record["bucket"] == BUCKET and record["latent_size"] == [16, 16]
    outs.append(out)
  assert len(sr._fns) == 1
  (fn,) = sr._fns.values()
  assert fn._cache_size() == 1  # traced and compiled once for all three sizes
  # An input already at the bucket's size is padded the same with or without it: same result.
  plain, _ = sr.upscale(pics[2], steps=STEPS)
  np.testing.assert_array_equal(plain.rgb, outs[2].rgb)
  assert len(sr._fns) == 1
  assert sr.resolve()["bucket"] == sr.lr_multiple
  m = sr.lr_multiple
  assert sr.resolve(bucket=m + 1)["bucket"] == 2 * m  # rounded up to the model's multiple
  with pytest.raises(ValueError, match="bucket=0"):
    sr.resolve(bucket=0)


def test_session_writes_result_and_sidecar_and_never_overwrites(run, tmp_path):
  workdir, sr = run
  session = DemoSession(sr, str(tmp_path / "out"), bucket=BUCKET)
  src = _image(tmp_path / "my photo.png", 10, 12, 0, "LA")
  depth = tmp_path / "depth.png"
  Image.fromarray(np.linspace(0, 255, 40 * 48).reshape(40, 48).astype(np.uint8)).save(depth)
  calls = []
  # The sampler the bucket test compiled (guidance, steps and strength are part of its key).
  settings = dict(guidance="mcfg", scale=1.5, steps=STEPS, seed=9.0, negative_prompt="ugly",
                  temperature={"edge": 2.5, "depth": 0.5}, enabled={"seg": False})
  result = session.run(src, caption="a cat", map_paths={"depth": str(depth), "seg": None},
                       progress=lambda done, total: calls.append((done, total)), **settings)
  total = sr.num_steps_run(STEPS, sr.config.sampling.strength)
  assert calls == [(i, total) for i in range(total + 1)]
  assert result.output.size == (40, 48) and result.bicubic.size == (40, 48)
  assert result.output.grey and result.output.alpha is not None  # the input's kind is kept
  assert os.path.basename(result.png) == "my_photo_sr1.png"
  with Image.open(result.png) as im:
    assert im.size == (48, 40) and im.mode == "LA"
  side = json.loads(open(result.sidecar).read())
  assert side == result.record
  assert side["input"] == "my photo.png" and side["workdir"] == os.path.abspath(workdir)
  assert side["guidance"] == "mcfg" and side["scale"] == 1.5 and side["seed"] == 9
  assert side["steps"] == STEPS and side["negative_prompt"] == "ugly"
  assert side["strength"] == sr.config.sampling.strength  # not set: the run's
  assert side["temperature"] == {"text": 1.0, "depth": 0.5, "seg": 1.0, "edge": 2.5}
  assert side["enabled"] == {"text": True, "depth": True, "seg": False, "edge": True}
  assert side["caption"] == "a cat" and side["maps"]["depth"] == "user"
  assert side["map_files"] == {"depth": "depth.png"} and side["bucket"] == BUCKET
  labels = [label for _, label in result.maps]
  assert labels[0] == "depth (user)" and labels[-1].startswith("edge (")
  assert not any(label.startswith("seg") for label in labels)  # switched off: not shown
  for picture, _ in result.maps:
    assert picture.shape == (40, 48, 3) and picture.dtype == np.uint8
  shown = result.maps[0][0][..., 0].astype(int)  # the user's map at its own (the output) size
  assert np.abs(shown - np.asarray(Image.open(depth), int)).max() <= 1
  again = session.run(src, caption="a cat", steps=STEPS)
  assert os.path.basename(again.png) == "my_photo_sr2.png"
  with Image.open(result.png) as im:  # the first result is still there, unchanged
    assert im.size == (48, 40)
  assert len(sr._fns) == 1  # same bucket: no new compile


def test_session_refuses_bad_input_before_any_work(run, tmp_path):
  _, sr = run
  session = DemoSession(sr, str(tmp_path / "out"), bucket=BUCKET, max_pixels=100)
  bad = tmp_path / "upload" / "broken.png"
  bad.parent.mkdir()
  bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage")
  big = _image(tmp_path / "big.png", 10, 11, 1)  # 110 pixels > 100
  good = _image(tmp_path / "good.png", 8, 8, 2)
  with pytest.raises(ValueError, match="no input image"):
    session.run(None)
  with pytest.raises(ValueError) as e:
    session.run(str(bad))
  assert str(e.value).startswith("broken.png: not a readable image")  # no server path
  assert str(tmp_path) not in str(e.value)
  with pytest.raises(ValueError, match=r"big.png: 11x10 = 110 pixels .*--max_pixels=100"):
    session.run(big)
  with pytest.raises(ValueError, match="seed=1.5"):
    session.run(good, seed=1.5)
  with pytest.raises(ValueError, match="seed=-1"):
    session.run(good, seed=-1)
  with pytest.raises(ValueError, match="temperature edge=0"):
    session.run(good, temperature={"edge": 0.0})
  with pytest.raises(ValueError, match="guidance"):
    session.run(good, guidance="nope")
  with pytest.raises(ValueError, match="^seg map broken.png: "):
    session.run(good, map_paths={"seg": str(bad)})
  assert os.listdir(tmp_path / "out") == []  # nothing was written
  with pytest.raises(ValueError, match="bucket=-4"):
    DemoSession(sr, str(tmp_path / "out2"), bucket=-4)
  (tmp_path / "file").write_text("x")
  with pytest.raises(NotADirectoryError):
    DemoSession(sr, str(tmp_path / "file"))


def test_session_refuses_a_thin_upload_by_its_work(run, tmp_path):
  """Few pixels, many tiles: refused at upload, before the sampler runs or compiles."""
  _, sr = run
  session = DemoSession(sr, str(tmp_path / "out"), bucket=BUCKET)
  thin = _image(tmp_path / "thin.png", 200, 3, 1)  # 600 pixels, ratio 66.7:1
  with pytest.raises(ValueError, match=r"^thin.png: 3x200 has an aspect ratio of 66.7:1 .*"
                     r"more than max_aspect_ratio=16 "):
    session.read_input(thin)
  with pytest.raises(ValueError, match="aspect ratio"):
    session.run(thin)
  assert not os.path.exists(tmp_path / "out") or os.listdir(tmp_path / "out") == []


# --- The page in a real browser.

CHROME_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                "--window-size=1500,1500",
                # Only this machine's loopback resolves: the page may fetch nothing from outside.
                "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1")


def _need_browser():
  """The browser test's tools; a skip (a failure under CI, which installs them) naming what
  is missing."""
  missing = [name for name in ("chromium", "chromedriver") if shutil.which(name) is None]
  for module in ("selenium", "gradio"):
    try:
      __import__(module)
    except ImportError:
      missing.append(f"python package {module}")
  if missing:
    reason = (f"the browser test needs {', '.join(missing)} (apt-get install chromium "
              "chromium-driver; pip install --no-deps -r requirements-app.txt)")
    if os.environ.get("CI"):
      pytest.fail(reason)
    pytest.skip(reason)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture
def server(run, tmp_path):
  """``python -m mmsr_jax.app`` on the tiny run, as a user starts it; ended when the test ends."""
  _need_browser()
  workdir, _ = run
  port = _free_port()
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, GRADIO_ANALYTICS_ENABLED="False",
             GRADIO_TEMP_DIR=str(tmp_path / "gradio"), PYTHONUNBUFFERED="1")
  env.pop("XLA_FLAGS", None)  # one CPU device
  log = open(tmp_path / "server.log", "w")
  out = tmp_path / "results"
  proc = subprocess.Popen(
      [sys.executable, "-m", "mmsr_jax.app", f"--workdir={workdir}", f"--port={port}",
       f"--output={out}", f"--bucket={BUCKET}", "--max_pixels=4096"],
      cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
  url = f"http://127.0.0.1:{port}/"
  try:
    deadline = time.time() + 600
    while True:
      if proc.poll() is not None:
        pytest.fail(f"the app exited ({proc.returncode}):\n{(tmp_path / 'server.log').read_text()}")
      try:
        with urllib.request.urlopen(url, timeout=5) as r:
          if r.status == 200:
            break
      except OSError:
        pass
      if time.time() > deadline:
        pytest.fail(f"the app did not serve in time:\n{(tmp_path / 'server.log').read_text()}")
      time.sleep(1)
    yield url, out, proc
  finally:
    if proc.poll() is None:
      os.killpg(proc.pid, signal.SIGTERM)
      try:
        proc.wait(30)
      except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    log.close()


@pytest.fixture
def browser(tmp_path):
  _need_browser()
  from selenium import webdriver
  from selenium.webdriver.chrome.service import Service
  options = webdriver.ChromeOptions()
  options.binary_location = shutil.which("chromium")
  for flag in CHROME_FLAGS + (f"--user-data-dir={tmp_path / 'chrome-profile'}",):
    options.add_argument(flag)
  # The driver is named, so Selenium Manager (which would download one) never runs.
  driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
  try:
    yield driver
  finally:
    driver.quit()


def _wait(driver, what, predicate, timeout=600, every=0.5):
  deadline = time.time() + timeout
  while time.time() < deadline:
    value = predicate()
    if value:
      return value
    time.sleep(every)
  pytest.fail(f"timed out waiting for {what}; page text:\n{_text(driver)[:3000]}")


def _text(driver) -> str:
  return driver.execute_script("return document.body.innerText")


def _error_toasts(driver) -> list[str]:
  return driver.execute_script(
      "return Array.from(document.querySelectorAll('.toast-body.error')).map(e => e.innerText);")


def _result_size(driver):
  return driver.execute_script(
      "const i = document.querySelector('#result img');"
      "return i && i.complete && i.naturalWidth ? [i.naturalWidth, i.naturalHeight] : null;")


def _set_number(driver, css, value):
  from selenium.webdriver.common.by import By
  from selenium.webdriver.common.keys import Keys
  field = driver.find_element(By.CSS_SELECTOR, css)
  field.send_keys(Keys.CONTROL, "a")
  field.send_keys(str(value), Keys.TAB)


def _upload(driver, path):
  from selenium.webdriver.common.by import By
  driver.find_element(By.CSS_SELECTOR, "#input-file input[type=file]").send_keys(path)


def _clear_upload(driver):
  from selenium.webdriver.common.by import By
  driver.find_element(By.CSS_SELECTOR, "#input-file button[aria-label='Clear']").click()


def _sidecar(driver):
  """The JSON sidecar, downloaded through the page's link."""
  links = driver.execute_script(
      "return Array.from(document.querySelectorAll('#downloads a')).map(a => a.href);")
  (link,) = [x for x in links if x.split("?")[0].endswith(".json")]
  with urllib.request.urlopen(link, timeout=30) as r:
    return json.loads(r.read())


def test_the_page_in_a_real_browser(server, browser, tmp_path):
  from selenium.webdriver.common.by import By
  url, out, proc = server
  first, second = str(tmp_path / "first.png"), str(tmp_path / "second.png")
  # Two photos whose LR sizes (24x32, 20x27) pad to the same bucket, 32x32.
  Image.fromarray(skimage.data.chelsea()).crop((60, 0, 380, 240)).resize(
      (32, 24), Image.Resampling.BICUBIC).save(first)
  Image.fromarray(skimage.data.coffee()).resize((27, 20), Image.Resampling.BICUBIC).save(second)
  bad = tmp_path / "broken.png"
  bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage")

  browser.get(url)
  _wait(browser, "the page", lambda: browser.find_elements(By.ID, "run"), timeout=60)
  assert browser.title == "MMSR super-resolution"
  assert "checkpoint step 1" in _text(browser)

  _upload(browser, first)
  _wait(browser, "the upload's check", lambda: "-> 128x96" in _text(browser), timeout=60)
  _set_number(browser, "#seed input", 7)
  _set_number(browser, "#steps input[type=number]", STEPS)
  _set_number(browser, "#temperature-edge input[type=number]", 2.5)
  browser.find_element(By.CSS_SELECTOR, "#use-seg input").click()
  browser.find_element(By.CSS_SELECTOR, "#caption textarea").send_keys("a cat")
  browser.find_element(By.ID, "run").click()
  seen = set()

  def done():
    text = _text(browser)
    seen.update(k for k in ("preparing", "DDIM steps") if k in text)
    return _result_size(browser)

  assert _wait(browser, "the result", done) == [128, 96]  # 4x the 32x24 input
  assert seen, "no progress was shown while sampling"
  _wait(browser, "the downloads", lambda: browser.find_elements(By.CSS_SELECTOR, "#downloads a"))
  side = _sidecar(browser)
  assert side["input"] == "first.png" and side["output_size"] == [96, 128]
  assert side["seed"] == 7 and side["steps"] == STEPS and side["caption"] == "a cat"
  assert side["temperature"] == {"text": 1.0, "depth": 1.0, "seg": 1.0, "edge": 2.5}
  assert side["enabled"] == {"text": True, "depth": True, "seg": False, "edge": True}
  assert side["guidance"] == "mcfg" and side["bucket"] == BUCKET
  assert sorted(os.listdir(out)) == ["first_sr1.json", "first_sr1.png"]
  with Image.open(out / "first_sr1.png") as im:
    assert im.size == (128, 96)
  maps = browser.find_elements(By.CSS_SELECTOR, "#maps img")
  assert maps, "the maps the model was given are not shown"
  shot = str(tmp_path / "app.png")
  browser.execute_script("window.scrollTo(0, 0);")
  browser.save_screenshot(shot)
  if os.environ.get("MMSR_WRITE_SCREENSHOT"):  # how docs/app_screenshot.png was made
    shutil.copy(shot, SCREENSHOT)

  # A broken file: a message on the page, and the server keeps serving.
  _clear_upload(browser)
  _upload(browser, str(bad))
  _wait(browser, "the upload's error", lambda: "Cannot use this file" in _text(browser),
        timeout=60)
  assert "broken.png: not a readable image" in _text(browser)
  browser.find_element(By.ID, "run").click()
  _wait(browser, "the run's error message", lambda: any(
      "broken.png: not a readable image" in t for t in _error_toasts(browser)), timeout=60)
  assert proc.poll() is None

  # A second image of another size in the same bucket, sent by two users at once: both are
  # served (queued, one at a time), each at 4x its size.
  _clear_upload(browser)
  _upload(browser, second)
  _wait(browser, "the second upload's check", lambda: "-> 108x80" in _text(browser), timeout=60)
  first_tab = browser.current_window_handle
  browser.switch_to.new_window("tab")
  browser.get(url)
  _wait(browser, "the page in a second tab", lambda: browser.find_elements(By.ID, "run"),
        timeout=60)
  _upload(browser, first)
  _wait(browser, "the upload in the second tab", lambda: "-> 128x96" in _text(browser),
        timeout=60)
  _set_number(browser, "#steps input[type=number]", STEPS)
  browser.find_element(By.ID, "run").click()
  browser.switch_to.window(first_tab)
  browser.find_element(By.ID, "run").click()
  _wait(browser, "the second result", lambda: _result_size(browser) == [108, 80])
  assert _sidecar(browser)["input"] == "second.png"
  second_tab = [h for h in browser.window_handles if h != first_tab][0]
  browser.switch_to.window(second_tab)
  _wait(browser, "the other user's result", lambda: _result_size(browser) == [128, 96])
  assert _sidecar(browser)["seed"] == 0  # that page's own controls
  assert sorted(os.listdir(out)) == sorted(
      ["first_sr1.json", "first_sr1.png", "first_sr2.json", "first_sr2.png",
       "second_sr1.json", "second_sr1.png"])

  # Nothing the page loaded came from outside this machine.
  urls = browser.execute_script(
      "return performance.getEntriesByType('resource').map(e => e.name);")
  outside = [u for u in urls if not u.startswith(("http://127.0.0.1", "data:", "blob:"))]
  assert outside == []
  assert proc.poll() is None
