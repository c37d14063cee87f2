"""`conf/` must be found from an installed wheel as well as from a checkout."""

import subprocess
import sys
import zipfile

import pytest

from mtft.recipe.config import conf_dir

from conftest import ROOT


def test_conf_found_from_checkout():
    assert conf_dir() == ROOT / "mtft" / "conf" and (conf_dir() / "train.yaml").is_file()


@pytest.mark.slow
def test_wheel_carries_conf_and_finds_it(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
    )
    (wheel,) = tmp_path.glob("mtft-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "mtft/conf/train.yaml" in names and "mtft/conf/balancer/uniform.yaml" in names
    target = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(target)
    out = subprocess.run(
        [sys.executable, "-c", "from mtft.recipe.config import conf_dir; print(conf_dir())"],
        env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    ).stdout.strip()
    assert out == str(target / "mtft" / "conf")
