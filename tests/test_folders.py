"""models/concept_erasure: numbered saves that never overwrite or leave partial files, safe names, listing."""
import os

import pytest
import torch

from comfyui_concept_erasure.erasure import ConceptErasure, ErasureError, load_erasure
from comfyui_concept_erasure.erasure import file_format, folders
from comfyui_concept_erasure.erasure.folders import (
    FOLDER, erasure_folder_paths, folder_paths, list_erasures, register_folder, resolve_erasure, save_erasure)


def erasure(seed=0):
    g = torch.Generator().manual_seed(seed)
    return ConceptErasure(context_dim=768, prompt_k=torch.randn(2, 768, generator=g),
                          prompt_v=torch.randn(2, 768, generator=g), concepts=[f"concept {seed}"], method="lp")


def all_files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files)


def test_saves_are_numbered_and_load_back(models_dir):
    first = save_erasure(erasure(1), "erased")
    second = save_erasure(erasure(2), "concept_erasure/erased")  # the folder name in the prefix is optional
    folder = models_dir / FOLDER
    assert first == str(folder / "erased_00001_.safetensors")
    assert second == str(folder / "erased_00002_.safetensors")
    assert load_erasure(first).concepts == ["concept 1"] and load_erasure(second).concepts == ["concept 2"]
    assert all_files(models_dir) == ["concept_erasure/erased_00001_.safetensors",
                                     "concept_erasure/erased_00002_.safetensors"]


def test_counter_continues_after_the_highest_number(models_dir):
    folder = models_dir / FOLDER
    folder.mkdir()
    for name in ("erased_00001_.safetensors", "erased_00007_.safetensors", "erased_more_00009_.safetensors"):
        (folder / name).write_bytes(b"x")
    assert os.path.basename(save_erasure(erasure(), "erased")) == "erased_00008_.safetensors"


def test_a_file_that_appears_meanwhile_is_not_overwritten(models_dir, monkeypatch):
    folder = models_dir / FOLDER
    counter = folders._next_counter

    def racing_counter(directory, stem):
        number = counter(directory, stem)
        (folder / f"{stem}_{number:05}_.safetensors").write_bytes(b"another save got here first")
        return number

    monkeypatch.setattr(folders, "_next_counter", racing_counter)
    path = save_erasure(erasure(), "erased")
    assert os.path.basename(path) == "erased_00002_.safetensors"
    assert (folder / "erased_00001_.safetensors").read_bytes() == b"another save got here first"
    assert all_files(folder) == ["erased_00001_.safetensors", "erased_00002_.safetensors"]


def test_without_hard_links_the_name_is_still_reserved_first(models_dir, monkeypatch):
    folder = models_dir / FOLDER
    folder.mkdir()
    (folder / "erased_00001_.safetensors").write_bytes(b"keep me")
    monkeypatch.setattr(folders, "_next_counter", lambda directory, stem: 1)  # as if the file came meanwhile

    def no_links(src, dst):
        raise OSError("hard links not supported")

    monkeypatch.setattr(folders.os, "link", no_links)
    path = save_erasure(erasure(3), "erased")
    assert os.path.basename(path) == "erased_00002_.safetensors"
    assert (folder / "erased_00001_.safetensors").read_bytes() == b"keep me"
    assert load_erasure(path).concepts == ["concept 3"]
    assert all_files(folder) == ["erased_00001_.safetensors", "erased_00002_.safetensors"]


def test_a_failed_move_leaves_no_placeholder(models_dir, monkeypatch):
    def fail(*args):
        raise OSError("not supported here")

    monkeypatch.setattr(folders.os, "link", fail)
    monkeypatch.setattr(folders.os, "replace", fail)
    with pytest.raises(OSError, match="not supported here"):
        save_erasure(erasure(), "erased")
    assert all_files(models_dir) == []


def test_a_tensor_that_cannot_be_written_leaves_no_file(models_dir):
    bad = erasure()
    bad.prompt_v = torch.empty(2, 768, device="meta")
    with pytest.raises(Exception):
        save_erasure(bad, "erased")
    assert all_files(models_dir) == []


def test_a_writer_failing_halfway_leaves_no_file(models_dir, monkeypatch):
    def half_write(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(file_format, "save_file", half_write)
    with pytest.raises(OSError, match="No space left"):
        save_erasure(erasure(), "sub/erased")
    assert all_files(models_dir) == []


@pytest.mark.parametrize("prefix", [
    "../erased", "concept_erasure/../../erased", "a/../../erased", "..\\erased", "/tmp/erased", "\\erased",
    "C:/erased", "c:erased", "", "   ", ".", "./", "concept_erasure/.."])
def test_prefixes_that_escape_the_folder_are_refused(models_dir, prefix):
    with pytest.raises(ErasureError, match=r"no '\.\.', no absolute path"):
        save_erasure(erasure(), prefix)
    assert all_files(models_dir.parent) == []


@pytest.mark.parametrize("name", [
    "../x.safetensors", "sub/../../x.safetensors", "..\\x.safetensors", "/etc/x.safetensors", "C:\\x.safetensors"])
def test_erasure_names_that_escape_the_folder_are_refused(models_dir, name):
    outside = models_dir.parent / "x.safetensors"
    save_erasure(erasure(), "x")
    os.replace(models_dir / FOLDER / "x_00001_.safetensors", outside)
    with pytest.raises(ErasureError, match=r"no '\.\.', no absolute path"):
        resolve_erasure(name)


def test_names_are_resolved_inside_the_folder(models_dir):
    path = save_erasure(erasure(4), "concept_erasure/artists/van_gogh")
    assert path == str(models_dir / FOLDER / "artists" / "van_gogh_00001_.safetensors")
    assert list_erasures() == ["artists/van_gogh_00001_.safetensors"]
    assert resolve_erasure("artists/van_gogh_00001_.safetensors") == path
    with pytest.raises(ErasureError, match="only .safetensors"):
        resolve_erasure("artists/van_gogh_00001_.ckpt")
    with pytest.raises(ErasureError, match="'gone.safetensors' not found in .*concept_erasure"):
        resolve_erasure("gone.safetensors")


def test_paths_added_before_registration_are_kept_and_listed(models_dir, tmp_path):
    fp = folder_paths()
    extra = tmp_path / "shared_erasures"
    extra.mkdir()
    fp.add_model_folder_path(FOLDER, str(extra))  # what extra_model_paths.yaml does at start-up
    save_erasure(erasure(5), "local")
    (extra / "shared.safetensors").write_bytes((models_dir / FOLDER / "local_00001_.safetensors").read_bytes())
    register_folder()
    paths = erasure_folder_paths()
    assert str(extra) in paths and str(models_dir / FOLDER) in paths
    assert len(paths) == len(set(paths)), "registering again added a path twice"
    assert list_erasures() == ["local_00001_.safetensors", "shared.safetensors"]
    assert resolve_erasure("shared.safetensors") == str(extra / "shared.safetensors")


def test_only_safetensors_files_are_listed(models_dir):
    folder = models_dir / FOLDER
    (folder / "sub").mkdir(parents=True)
    for name in ("a.safetensors", "B.SAFETENSORS", "sub/c.safetensors", "old.ckpt", "old.pt", "old.pth", "old.bin",
                 "notes.txt", "pickled.pkl", ".erased.1234.tmp"):
        (folder / name).write_bytes(b"x")
    expected = ["B.SAFETENSORS", "a.safetensors", "sub/c.safetensors"]
    assert list_erasures() == expected
    assert sorted(folder_paths().get_filename_list(FOLDER)) == expected  # registered as .safetensors-only
    assert set(folder_paths().folder_names_and_paths[FOLDER][1]) == {".safetensors"}


def test_a_saved_file_is_listed_at_once(models_dir):
    assert list_erasures() == []
    save_erasure(erasure(), "erased")
    assert list_erasures() == ["erased_00001_.safetensors"]
    save_erasure(erasure(), "erased")
    assert list_erasures() == ["erased_00001_.safetensors", "erased_00002_.safetensors"]
