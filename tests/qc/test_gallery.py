"""The visual QC report: case figures, the HTML gallery (driven in headless Chromium) and the
ITK-SNAP / 3D Slicer colour tables."""
from __future__ import annotations

import math
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from wh_errmap.data.structures import STRUCTURES
from wh_errmap.qc import colours, figure, gallery
from wh_errmap.utils.text import DASH

SHAPE = (24, 20, 16)
BLOCK = (slice(15, 20), slice(4, 9), slice(9, 14))  # the predicted errors: centre (17, 6, 11)
SCRIPT_PAIR = "ct_1006 <script>window.pwned = 1</script>"


def synthetic_case() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """A (24, 20, 16) scan and mask of a ball of LV inside Myo on a black background, and
  certain errors in BLOCK (on the background) plus a lone more certain voxel elsewhere."""
  x, y, z = np.meshgrid(*(np.arange(s) for s in SHAPE), indexing="ij")
  distance = np.sqrt((x - 8) ** 2 + (y - 10) ** 2 + (z - 7) ** 2)
  mask = np.where(distance < 6, 1, 0).astype(np.uint8)
  mask[distance < 3] = 3
  error_prob = np.zeros(SHAPE, np.float32)
  error_prob[BLOCK] = 0.9
  error_prob[2, 17, 2] = 1.0
  image = np.choose(mask, [-1.0, 0.2, 0.0, 0.7]).astype(np.float32)
  return image, mask, error_prob


def test_worst_point_is_the_centre_of_the_densest_errors():
  _, _, error_prob = synthetic_case()
  assert figure.worst_point(error_prob) == (17, 6, 11)


def test_worst_point_ignores_errors_outside_valid():
  _, _, error_prob = synthetic_case()
  error_prob[:, :, 0:5] = 1.0  # a padding slab, all "wrong"
  valid = np.ones(SHAPE, bool)
  valid[:, :, 0:5] = False
  assert figure.worst_point(error_prob)[2] == 2
  assert figure.worst_point(error_prob, valid) == (17, 6, 11)
  assert figure.worst_point(error_prob, np.zeros(SHAPE, bool)) is None


def test_focus_point_without_errors_is_the_mask_centre_else_the_volume_centre():
  _, mask, _ = synthetic_case()
  quiet = np.full(SHAPE, 0.2, np.float32)
  assert figure.worst_point(quiet) is None
  assert figure.focus_point(quiet, mask) == (8, 10, 7)
  assert figure.focus_point(quiet, np.zeros(SHAPE, np.uint8)) == (12, 10, 8)


def test_view_slices_are_in_radiological_orientation():
  """Axial: anterior (high Y) up, patient's right (high X) on the left; coronal: superior
  (high Z) up; sagittal: anterior on the left."""
  volume = np.zeros(SHAPE)
  volume[23, 19, 5] = 1  # right, anterior
  volume[23, 3, 15] = 2  # right, superior
  volume[0, 19, 15] = 3  # left, anterior, superior
  volume[0, 0, 5] = 4  # left, posterior
  axial, coronal, sagittal = figure.VIEWS
  assert figure.view_slice(volume, (0, 0, 5), axial)[0, 0] == 1
  assert figure.view_slice(volume, (0, 3, 0), coronal)[0, 0] == 2
  assert figure.view_slice(volume, (0, 0, 0), sagittal)[0, 0] == 3
  assert figure.view_slice(volume, (0, 0, 5), axial)[-1, -1] == 4
  assert figure.view_slice(volume, (0, 0, 5), axial).shape == (20, 24)   # (Y, X)
  assert figure.view_slice(volume, (23, 0, 0), sagittal).shape == (16, 20)  # (Z, Y)


def test_case_figure_shows_the_worst_region_in_all_three_views(tmp_path):
  image, mask, error_prob = synthetic_case()
  valid = np.ones(SHAPE, bool)
  valid[:, :, 0:5] = False
  padded = error_prob.copy()
  padded[:, :, 0:5] = 1.0  # errors on padding: neither looked at nor drawn
  path, thumb = tmp_path / "case.png", tmp_path / "case_thumb.png"
  figure.case_figure(path, image, mask, padded, (1.2, 1.0, 2.0), "ct_1001 <fail>",
                      valid=valid, thumbnail_path=thumb)
  figure.case_figure(tmp_path / "unpadded.png", image, mask, error_prob, (1.2, 1.0, 2.0),
                      "ct_1001 <fail>", valid=valid)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["case.png", "case_thumb.png",
                                                        "unpadded.png"]  # no temporaries
  assert np.array_equal(imread(path), imread(tmp_path / "unpadded.png"))
  pixels = imread(path)
  width, height = (round(s * figure.DPI) for s in figure.FIGSIZE)
  assert pixels.shape[:2] == (height, width)
  assert imread(thumb).shape[1] == figure.THUMBNAIL_WIDTH
  # Red overlay on the black scan, in each third of the panels' band (the legend, below it,
  # has a red patch too).
  red = (pixels[..., 0] > 0.3) & (pixels[..., 1] < 0.1) & (pixels[..., 2] < 0.1)
  band = red[int(0.14 * height):int(0.88 * height)]
  thirds = np.array_split(band, 3, axis=1)
  assert all(third.sum() > 20 for third in thirds), [int(t.sum()) for t in thirds]


def test_case_figure_without_errors_draws_the_mask(tmp_path):
  image, mask, _ = synthetic_case()
  figure.case_figure(tmp_path / "case.png", image, mask, np.zeros(SHAPE, np.float32),
                      (1.0, 1.0, 1.0), "clean")
  pixels = imread(tmp_path / "case.png")
  orange = np.array(colours.STRUCTURE_RGB["Myo"]) / 255
  assert (np.abs(pixels[..., :3] - orange).max(axis=-1) < 0.08).sum() > 50


def read_itksnap(path: Path) -> dict[int, tuple[tuple[int, int, int], float, str]]:
  table = {}
  for line in path.read_text().splitlines():
    if line.startswith("#"):
      continue
    match = re.fullmatch(r'\s*(\d+)\s+(\d+)\s+(\d+)\s+(\d+)\s+([\d.]+)\s+([01])\s+([01])\s+"(.*)"',
                         line)
    assert match, line
    value, r, g, b = (int(v) for v in match.groups()[:4])
    table[value] = ((r, g, b), float(match[5]), match[8])
  return table


def read_slicer(path: Path) -> dict[int, tuple[str, tuple[int, int, int], int]]:
  lines = path.read_text().splitlines()
  assert lines[0].startswith("# Color table file")
  table = {}
  for line in lines:
    if not line.startswith("#"):
      value, name, r, g, b, a = line.split()
      table[int(value)] = (name, (int(r), int(g), int(b)), int(a))
  assert lines[1] == f"# {len(table)} values"
  return table


def test_colour_tables_parse_back(tmp_path):
  structures = [(205, "Myo"), (420, "LA"), (500, "LV"), (850, "left pulmonary")]
  paths = colours.write_colour_tables(tmp_path, structures)
  assert [p.name for p in paths] == ["labels.itksnap.txt", "labels.slicer.ctbl",
                                     "errors.itksnap.txt", "errors.slicer.ctbl"]
  itksnap, slicer = read_itksnap(paths[0]), read_slicer(paths[1])
  assert sorted(itksnap) == sorted(slicer) == [0, 205, 420, 500, 850]
  assert itksnap[0] == ((0, 0, 0), 0.0, "Clear Label")
  assert itksnap[205] == (colours.STRUCTURE_RGB["Myo"], 1.0, "Myo")
  assert itksnap[850] == (colours.UNKNOWN_RGB, 1.0, "left pulmonary")
  assert slicer[420] == ("LA", colours.STRUCTURE_RGB["LA"], 255)
  assert slicer[850] == ("left_pulmonary", colours.UNKNOWN_RGB, 255)
  assert slicer[0][2] == 0
  assert read_itksnap(paths[2]) == {0: ((0, 0, 0), 0.0, "correct"),
                                    1: ((255, 0, 0), 1.0, "predicted error")}
  assert read_slicer(paths[3])[1] == ("predicted_error", (255, 0, 0), 255)
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths)


def test_structure_colours_are_distinct_and_not_the_error_red():
  rgb = [colours.structure_rgb(s) for s in STRUCTURES]
  assert len(set(rgb)) == len(STRUCTURES)
  assert colours.ERROR_RGB not in rgb and colours.UNKNOWN_RGB not in rgb


@pytest.mark.parametrize("structures", [[(1, "RV"), (1, "Myo")], [(0, "RV")]])
def test_colour_tables_refuse_bad_values(tmp_path, structures):
  with pytest.raises(ValueError):
    colours.write_colour_tables(tmp_path, structures)


def gallery_rows(folder: Path | None = None) -> list[dict]:
  """Six cases of mixed verdicts, in no particular order; with `folder`, their figures are
  drawn there."""
  specs = [("ct_1001", "ok", 0.91), ("ct_1002", "review", 0.74),
           ("ct_1003", "fail", 0.41), ("ct_1004", "out_of_distribution", None),
           ("ct_1005", "ok", 0.88), (SCRIPT_PAIR, "review", math.nan)]
  rows = []
  for i, (pair, verdict, dice) in enumerate(specs):
    name = f"case{i}"
    if folder is not None:
      image, mask, error_prob = synthetic_case()
      error_prob *= 0.0 if verdict == "ok" else 1.0
      figure.case_figure(folder / f"{name}.png", image, mask, error_prob, (1.0, 1.0, 1.5),
                          f"{pair}: {verdict}", thumbnail_path=folder / f"{name}_thumb.png")
    per_structure = {s: (None if dice is None or math.isnan(dice) else dice + 0.01 * k)
                     for k, s in enumerate(STRUCTURES)}
    rows.append({
        "pair": pair, "verdict": verdict, "mean_predicted_dice": dice,
        "min_predicted_dice": None if dice is None else dice - 0.1,
        "qi": 0.99 - 0.01 * i, "soft_qi": 0.985 - 0.01 * i,
        "reasons": [] if verdict == "ok" else [f"mean predicted Dice < 0.8 <{i}>"],
        "png": f"{name}.png", "thumbnail": f"{name}_thumb.png",
        "files": [f"{name}/qc.json", f"{name}/error_prob.nii.gz"],
        "predicted_dice": per_structure})
  return rows


# Worst first: verdict severity, then mean predicted Dice (a missing one last).
DEFAULT_ORDER = ["ct_1004", "ct_1003", "ct_1002", SCRIPT_PAIR, "ct_1005", "ct_1001"]


def test_gallery_html_escapes_and_orders_worst_first(tmp_path):
  path = gallery.write_gallery(tmp_path, gallery_rows(), title="QC <batch 1>")
  assert path == tmp_path / "index.html"
  page = path.read_text()
  assert "<script>window.pwned" not in page
  assert "ct_1006 &lt;script&gt;window.pwned = 1&lt;/script&gt;" in page
  assert "QC &lt;batch 1&gt;" in page and "&lt;5&gt;" in page
  order = [p.replace("&lt;", "<").replace("&gt;", ">") for p in
           re.findall(r'<tr data-pair="([^"]*)"', page)]
  assert order == DEFAULT_ORDER
  for key in ("pair", "verdict", "mean_predicted_dice", "min_predicted_dice", "qi",
              "dice-Myo", "dice-PA"):
    assert f'id="sort-{key}"' in page
  assert re.search(r"2 ok.*2 review.*1 fail.*1 out_of_distribution", page)
  assert page.count(DASH) >= 2 * len(STRUCTURES)  # ct_1004's and the NaN case's
  assert not re.search(r"(src|href)=\"(https?:)?//", page)  # nothing from the network


def _browser_paths() -> tuple[str, str] | None:
  browser = next((p for p in map(shutil.which, ("chromium", "chromium-browser",
                                                 "google-chrome")) if p), None)
  driver = shutil.which("chromedriver")
  return (browser, driver) if browser and driver else None


def headless_chromium(webdriver, paths: tuple[str, str], height: int = 1250):
  """A selenium driver of headless Chromium at `paths` = (browser, chromedriver)."""
  options = webdriver.ChromeOptions()
  options.binary_location = paths[0]
  for argument in ("--headless=new", "--no-sandbox", "--disable-gpu",
                   "--disable-dev-shm-usage", f"--window-size=1700,{height}"):
    options.add_argument(argument)
  return webdriver.Chrome(options=options,
                          service=webdriver.ChromeService(executable_path=paths[1]))


def test_gallery_sorts_in_a_headless_browser(tmp_path):
  """Loads index.html from file:// in headless Chromium and clicks the headers. Saves a
  screenshot to $WH_GALLERY_SCREENSHOT if set."""
  webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
  paths = _browser_paths()
  if paths is None:
    pytest.skip("chromium and chromedriver are not on PATH (CI installs them: "
                "apt-get install chromium chromium-driver)")
  from selenium.webdriver.common.by import By
  from selenium.webdriver.support.ui import WebDriverWait

  rows = gallery_rows(tmp_path)
  page = gallery.write_gallery(tmp_path, rows, title="wh_errmap QC: synthetic batch")
  driver = headless_chromium(webdriver, paths)
  try:
    driver.get(page.as_uri())

    def shown() -> list[str]:
      return [r.get_attribute("data-pair") for r in
              driver.find_elements(By.CSS_SELECTOR, "#cases tbody tr") if r.is_displayed()]

    def verdicts() -> list[str]:
      return [e.text for e in driver.find_elements(By.CSS_SELECTOR,
                                                   "#cases tbody tr .badge")]

    assert shown() == DEFAULT_ORDER
    assert driver.execute_script("return window.pwned") is None
    WebDriverWait(driver, 10).until(lambda d: d.execute_script(
        "return Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)"))

    by_dice = sorted((r for r in rows if gallery._number(r["mean_predicted_dice"])),
                     key=lambda r: r["mean_predicted_dice"])
    missing = ["ct_1004", SCRIPT_PAIR]  # missing values last, in the default order
    header = driver.find_element(By.ID, "sort-mean_predicted_dice")
    header.click()
    assert shown() == [r["pair"] for r in by_dice] + missing
    assert header.get_attribute("aria-sort") == "ascending"
    header.click()
    assert shown() == [r["pair"] for r in reversed(by_dice)] + missing
    assert header.get_attribute("aria-sort") == "descending"

    driver.find_element(By.ID, "sort-verdict").click()
    assert verdicts() == ["out_of_distribution", "fail", "review", "review", "ok", "ok"]
    assert header.get_attribute("aria-sort") is None
    driver.find_element(By.ID, "sort-verdict").click()
    assert verdicts() == ["ok", "ok", "review", "review", "fail", "out_of_distribution"]

    driver.find_element(By.ID, "sort-pair").click()
    assert shown() == sorted(DEFAULT_ORDER)
    if os.environ.get("WH_GALLERY_SCREENSHOT"):
      driver.find_element(By.ID, "sort-verdict").click()
      assert driver.save_screenshot(os.environ["WH_GALLERY_SCREENSHOT"])
  finally:
    driver.quit()
