"""The kernels/ tree ships as fastdrmm.kernels: every subpackage is declared, sources included."""

import configparser
import pathlib

import fastdrmm.kernels

ROOT = pathlib.Path(__file__).resolve().parents[1]


def declared():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    packages = {p.strip() for p in cfg["options"]["packages"].split() if p.strip()}
    return cfg, packages


def test_every_kernel_package_is_declared():
    _, packages = declared()
    on_disk = {
        "fastdrmm.kernels" + ("." + ".".join(p.parent.relative_to(ROOT / "kernels").parts)
                              if p.parent != ROOT / "kernels" else "")
        for p in (ROOT / "kernels").rglob("__init__.py")
    }
    on_disk |= {"fastdrmm." + ".".join(p.parent.relative_to(ROOT / "fastdrmm").parts)
                for p in (ROOT / "fastdrmm").rglob("__init__.py") if p.parent != ROOT / "fastdrmm"}
    missing = on_disk - packages
    assert not missing, f"packages missing from setup.cfg: {sorted(missing)}"


def test_kernels_map_to_the_kernels_folder():
    cfg, _ = declared()
    assert "fastdrmm.kernels = kernels" in cfg["options"]["package_dir"]
    assert "*.cu" in cfg["options.package_data"]["fastdrmm.kernels.cuda"]
    # in this (editable or plain) install the module resolves to the repository's kernels/
    assert pathlib.Path(fastdrmm.kernels.__file__).parent.name == "kernels"
