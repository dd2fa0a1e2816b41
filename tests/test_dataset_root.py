"""dataset_root.py: env overrides, defaults, and errors that name the variable and the path."""

import pytest

import dataset_root


def test_env_override_and_derived_saliency_default(tmp_path, monkeypatch):
    voc = tmp_path / "voc"
    (voc / "saliency_map").mkdir(parents=True)
    monkeypatch.setenv("SPCAM_VOC12_ROOT", str(voc))
    monkeypatch.delenv("SPCAM_VOC12_SAL_ROOT", raising=False)
    assert dataset_root.voc12_root() == voc
    assert dataset_root.voc12_saliency_root() == voc / "saliency_map"
    assert not dataset_root.is_overridden("SPCAM_VOC12_SAL_ROOT")
    sal = tmp_path / "poolnet"
    sal.mkdir()
    monkeypatch.setenv("SPCAM_VOC12_SAL_ROOT", str(sal))
    assert dataset_root.voc12_saliency_root() == sal and dataset_root.is_overridden("SPCAM_VOC12_SAL_ROOT")


def test_coco_roots(tmp_path, monkeypatch):
    coco = tmp_path / "coco"
    (coco / "saliency_maps_poolnet").mkdir(parents=True)
    monkeypatch.setenv("SPCAM_COCO14_ROOT", str(coco))
    monkeypatch.delenv("SPCAM_COCO14_SAL_ROOT", raising=False)
    assert dataset_root.coco14_root() == coco
    assert dataset_root.coco14_saliency_root() == coco / "saliency_maps_poolnet"


@pytest.mark.parametrize(
    "fn, var",
    [
        (dataset_root.voc12_root, "SPCAM_VOC12_ROOT"),
        (dataset_root.voc12_saliency_root, "SPCAM_VOC12_SAL_ROOT"),
        (dataset_root.coco14_root, "SPCAM_COCO14_ROOT"),
        (dataset_root.coco14_saliency_root, "SPCAM_COCO14_SAL_ROOT"),
    ],
)
def test_missing_folder_names_variable_and_path(fn, var, tmp_path, monkeypatch):
    missing = tmp_path / "missing"
    monkeypatch.setenv(var, str(missing))
    with pytest.raises(FileNotFoundError) as e:
        fn()
    assert var in str(e.value) and str(missing) in str(e.value) and "\n" not in str(e.value)
    assert fn(must_exist=False) == missing


def test_default_names_the_variable(monkeypatch):
    monkeypatch.delenv("SPCAM_COCO14_ROOT", raising=False)
    path = dataset_root.coco14_root(must_exist=False)
    assert path == dataset_root.COCO14_DEFAULT
    if not path.is_dir():
        with pytest.raises(FileNotFoundError, match="SPCAM_COCO14_ROOT"):
            dataset_root.coco14_root()
