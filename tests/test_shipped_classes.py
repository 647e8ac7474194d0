"""The class lists shipped in the package: the released code's lists byte for byte (../shared holds
copies fetched from it), found by every name of each dataset, and used by `build --dataset` when no
--classes is given."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from coder_index import TextIndex
from coder_index.core.errors import InputFormatError
from coder_index.core.presets import data_file, shipped_class_list, shipped_class_lists
from coder_index_cli.main import cli

from conftest import shared_path


def released_keys():
    return [k for k in data_file("cvpr24.json") if not k.startswith("_")]


@pytest.mark.parametrize("key", released_keys())
def test_every_cvpr24_dataset_has_its_released_list_by_every_name(key):
    entry = data_file("cvpr24.json")[key]
    names = {key, entry["dataset"], *entry["aliases"]}
    want = "ImageNet" if key == "ImageNet-V2" else key
    expected = shared_path("data", "classnames", f"{want}.txt").read_bytes()
    for name in names:
        assert shipped_class_list(name).read_bytes() == expected, name


def test_unknown_dataset_names_the_fix():
    with pytest.raises(InputFormatError) as err:
        shipped_class_list("cifar10")
    assert "--classes FILE" in str(err.value) and "ImageNet" in str(err.value)
    assert "ImageNet-V2" not in shipped_class_lists() and len(shipped_class_lists()) == 13


def test_build_takes_the_shipped_list_of_the_dataset(tmp_path, tiny_model):
    res = CliRunner().invoke(cli, ["build", str(tmp_path / "pets"), "--dataset", "oxford_pets", "--model", tiny_model,
                                   "-q"])
    assert res.exit_code == 0, res.output
    listed = shared_path("data", "classnames", "oxford-pet.txt").read_text(encoding="utf-8").split("\n")
    assert TextIndex.open(tmp_path / "pets").class_names() == [c.strip() for c in listed if c.strip()]
    res = CliRunner().invoke(cli, ["build", str(tmp_path / "x"), "--model", tiny_model])
    assert res.exit_code == 2 and "--classes FILE" in res.output and "oxford-pet" in res.output
    res = CliRunner().invoke(cli, ["build", str(tmp_path / "y"), "--dataset", "cifar10", "--model", tiny_model])
    assert res.exit_code != 0 and "no class list ships for --dataset 'cifar10'" in res.output
