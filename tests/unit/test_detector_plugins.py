"""Third-party detectors through the `kvedge.detectors` entry-point group: a fake distribution (a
dist-info folder with an entry_points.txt, and its module, on sys.path) is found by name, imported only
when its name is asked for, reached by `--detector NAME`, and never overrides a built-in name."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kvedge.errors import KvedgeError, UnknownName
from kvedge.registry import DETECTORS, PluginError, Registry

PLUGIN = textwrap.dedent('''
    from kvedge.detectors.keyword import Detection
    from kvedge.errors import DetectorError


    class Shouty:
        """Calls every answer in capitals a refusal."""

        name = "shouty"
        version = "1"
        id = "shouty-v1"

        def detect(self, prompt, response):
            return Detection(response.isupper() or not response.strip(), "shouty")

        def final(self, response):
            return False


    def make(arg=None):
        if arg == "stop":  # lets a CLI test show it got here without loading any model
            raise DetectorError("the shouty plugin was reached with 'stop'")
        return Shouty()


    def other(arg=None):
        return Shouty()
''')


def fake_distribution(site: Path, dist: str, entry_points: dict[str, str], module: str | None = None) -> Path:
    """A minimal installed distribution: what pip leaves in site-packages, reduced to what
    importlib.metadata reads."""
    info = site / f"{dist.replace('-', '_')}-1.0.dist-info"  # named as pip names it
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    lines = "".join(f"{name} = {target}\n" for name, target in entry_points.items())
    (info / "entry_points.txt").write_text(f"[kvedge.detectors]\n{lines}")
    if module:
        (site / f"{module}.py").write_text(PLUGIN)
    return site


@pytest.fixture
def site(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    # the registry reads the group once; start this test from a registry that has not read it yet
    monkeypatch.setattr(DETECTORS, "_plugins", None)
    monkeypatch.setattr(DETECTORS, "_loaded", {})
    yield site
    for name in [m for m in sys.modules if m.startswith("kvedge_fake_plugin")]:
        del sys.modules[name]


def test_a_plugin_is_found_by_name_and_imported_only_when_asked_for(site):
    fake_distribution(site, "kvedge-shouty", {"shouty": "kvedge_fake_plugin:make"}, module="kvedge_fake_plugin")
    assert "shouty" in DETECTORS.names() and "shouty" in DETECTORS
    assert "keyword" in DETECTORS.names() and "judge" in DETECTORS.names()
    assert "kvedge_fake_plugin" not in sys.modules  # listed, not imported

    from kvedge.detectors import make_detector

    det = make_detector("shouty")
    assert "kvedge_fake_plugin" in sys.modules
    assert det.id == "shouty-v1"
    assert det.detect("q", "NO.").refused and not det.detect("q", "Sure, here it is.").refused
    assert make_detector("keyword").name == "keyword"  # the built-ins are untouched


def test_a_plugin_never_overrides_a_built_in_name(site):
    fake_distribution(site, "kvedge-impostor", {"keyword": "kvedge_fake_plugin:make"}, module="kvedge_fake_plugin")
    with pytest.raises(PluginError, match="'keyword' is built into kvedge; the package kvedge-impostor 1.0") as err:
        DETECTORS.get("keyword")
    assert isinstance(err.value, KvedgeError)  # the CLI's one line and exit 2
    assert DETECTORS.get("judge")  # only the clashing name is refused


def test_two_packages_claiming_one_name_are_both_named(site):
    fake_distribution(site, "kvedge-one", {"shouty": "kvedge_fake_plugin:make"}, module="kvedge_fake_plugin")
    fake_distribution(site, "kvedge-two", {"shouty": "kvedge_fake_plugin:other"})
    with pytest.raises(PluginError, match="kvedge-one 1.0.*kvedge-two 1.0|kvedge-two 1.0.*kvedge-one 1.0"):
        DETECTORS.get("shouty")


def test_a_plugin_that_cannot_be_imported_is_named(site):
    fake_distribution(site, "kvedge-broken", {"broken": "kvedge_fake_plugin_missing:make"})
    with pytest.raises(PluginError, match="'broken' from the package kvedge-broken 1.0 cannot be loaded"):
        DETECTORS.get("broken")
    with pytest.raises(UnknownName, match="broken"):  # unknown names list the plugins among the choices
        DETECTORS.get("nonesuch")


def test_registries_without_a_group_read_no_entry_points(site):
    fake_distribution(site, "kvedge-shouty", {"shouty": "kvedge_fake_plugin:make"}, module="kvedge_fake_plugin")
    reg: Registry = Registry("detector", "kvedge.detectors")
    assert "shouty" not in reg.names()


def test_the_cli_detector_option_reaches_a_plugin(site, tmp_path):
    fake_distribution(site, "kvedge-shouty", {"shouty": "kvedge_fake_plugin:make"}, module="kvedge_fake_plugin")
    paths = [str(site), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    proc = subprocess.run([sys.executable, "-m", "kvedge", "audit", "--detector", "shouty:stop",
                           "--out", str(tmp_path / "run")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == "kvedge: error: the shouty plugin was reached with 'stop'"
    assert not (tmp_path / "run").exists()
