"""Data of the examples: CG-Digits, the CREMA-D / Kinetics-Sounds layout readers and preprocessing."""

from __future__ import annotations

import csv
import random
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")

from mmpareto_examples import CONFIG_DIR, preprocess_av
from mmpareto_examples.av_datasets import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AVDataset,
    CremaDDataModule,
    KineticsSoundsDataModule,
    read_class_list,
    sample_frame_indices,
)
from mmpareto_examples.cg_digits import PALETTE, CGDigitsDataModule, build_cg_digits
from mmpareto_examples.fake_data import frame_intensity, write_fake_av_dataset

REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------- CG-Digits
@pytest.fixture(scope="module")
def digits3():
    return build_cg_digits(("gray", "color", "noisy"), color_correlation=0.97, noise_std=0.5, split_seed=0)


def test_cg_digits_shapes_and_splits(digits3):
    sizes = {name: len(split["label"]) for name, split in digits3.items()}
    assert sum(sizes.values()) == 1797  # every scikit-learn digit used exactly once
    assert 0.55 < sizes["train"] / 1797 < 0.65
    for split in digits3.values():
        n = len(split["label"])
        assert split["gray"].shape == (n, 1, 8, 8)
        assert split["color"].shape == (n, 3, 8, 8)
        assert split["noisy"].shape == (n, 1, 8, 8)
        assert split["label"].dtype == torch.long
        assert set(split["label"].tolist()) == set(range(10))
        assert float(split["gray"].min()) >= 0.0 and float(split["gray"].max()) <= 1.0


def test_cg_digits_colour_is_a_training_shortcut_only(digits3):
    train, test = digits3["train"], digits3["test"]
    tied_train = (train["color_index"] == train["label"]).float().mean().item()
    tied_test = (test["color_index"] == test["label"]).float().mean().item()
    assert 0.94 < tied_train < 0.995
    assert tied_test < 0.2  # random colours: about 1/10 agree by chance
    # Every class sees several different colours at test time, so colour cannot identify it there.
    for cls in range(10):
        assert len(set(test["color_index"][test["label"] == cls].tolist())) >= 4


def test_cg_digits_colour_view_is_another_image_of_the_same_class(digits3):
    train = digits3["train"]
    palette = torch.from_numpy(PALETTE)
    same_as_gray = 0
    for i in range(0, len(train["label"]), 37):
        c = int(train["color_index"][i])
        ch = int(palette[c].argmax())
        recovered = train["color"][i, ch] / palette[c, ch]  # undo the tint
        label = train["label"][i]
        same_class = train["gray"][train["label"] == label][:, 0]
        assert torch.isclose(same_class, recovered, atol=1e-5).flatten(1).all(1).any()
        same_as_gray += bool(torch.allclose(recovered, train["gray"][i, 0], atol=1e-5))
    assert same_as_gray == 0


def test_cg_digits_is_deterministic_per_split_seed():
    a = build_cg_digits(split_seed=3)
    b = build_cg_digits(split_seed=3)
    c = build_cg_digits(split_seed=4)
    assert torch.equal(a["train"]["color"], b["train"]["color"])
    assert not torch.equal(a["train"]["label"], c["train"]["label"])


def test_cg_digits_rejects_unknown_modalities():
    with pytest.raises(ValueError, match="unknown CG-Digits modalities"):
        build_cg_digits(("gray", "depth"))
    with pytest.raises(ValueError, match="color_correlation"):
        build_cg_digits(color_correlation=1.5)


def test_cg_digits_datamodule_batches():
    dm = CGDigitsDataModule(modalities=["gray", "color", "noisy"], batch_size=16)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"gray", "color", "noisy", "label"}
    assert batch["gray"].shape == (16, 1, 8, 8)
    assert batch["color"].shape == (16, 3, 8, 8)
    assert batch["label"].shape == (16,)
    assert dm.num_classes == 10 and dm.class_names[3] == "3"
    val = next(iter(dm.val_dataloader()))
    assert torch.equal(val["label"], dm.dataset("val").tensors["label"][:16])  # not shuffled


# ------------------------------------------------------------------------------------- AV layout readers
@pytest.fixture
def cremad_root(tmp_path):
    # A non-official class order proves that the order comes from stat.csv.
    classes = ["ANG", "NEU", "HAP"]
    lists = write_fake_av_dataset(tmp_path / "cremad", classes=classes, frames_per_clip=6, audio_steps=40)
    return tmp_path / "cremad", classes, lists


def test_class_list_and_labels_follow_stat_csv(cremad_root):
    root, classes, lists = cremad_root
    assert read_class_list(root / "stat.csv") == classes
    dm = CremaDDataModule(str(root), batch_size=2, num_workers=0, image_size=32)
    assert dm.class_names == classes and dm.num_classes == 3
    ds = dm.dataset("train")
    assert ds.clips == [clip for clip, _ in lists["train"]]
    assert ds.labels == [classes.index(label) for _, label in lists["train"]]


def test_cremad_defaults_to_the_official_class_order(tmp_path):
    root = tmp_path / "c"
    write_fake_av_dataset(root, classes=["NEU", "HAP", "SAD", "FEA", "DIS", "ANG"], write_class_list=False)
    dm = CremaDDataModule(str(root), num_workers=0)
    assert dm.class_names == ["NEU", "HAP", "SAD", "FEA", "DIS", "ANG"]
    assert dm.dataset("test").labels == [0, 1, 2, 3, 4, 5]


def test_kinetics_sounds_reads_txt_lists_and_needs_a_class_list(tmp_path):
    root = tmp_path / "ks"
    write_fake_av_dataset(
        root, classes=["playing drums", "tapping guitar"], list_ext="txt", frames_per_clip=9
    )
    dm = KineticsSoundsDataModule(str(root), batch_size=4, num_workers=0, image_size=32)
    batch = next(iter(dm.train_dataloader()))
    assert batch["visual"].shape == (4, 3, 3, 32, 32)  # default 3 frames per clip
    assert sorted(batch["label"].tolist()) == [0, 0, 1, 1]
    (root / "stat.csv").unlink()
    with pytest.raises(FileNotFoundError, match="class list"):
        KineticsSoundsDataModule(str(root), num_workers=0)


def test_av_sample_shapes_and_normalisation(cremad_root):
    root, _, _ = cremad_root
    ds = AVDataset(root, "test.csv", ["ANG", "NEU", "HAP"], train=False, num_frames=2, image_size=48)
    sample = ds[0]
    assert sample["audio"].shape == (1, 40, 128) and sample["audio"].dtype == torch.float32
    np.testing.assert_allclose(
        sample["audio"][0].numpy(), np.load(root / "audio" / f"{ds.clips[0]}.npy"), rtol=0, atol=0
    )
    assert sample["visual"].shape == (3, 2, 48, 48)
    assert sample["label"].item() == ds.labels[0]
    # ImageNet normalisation of a solid gray frame: each channel is constant at (v/255 - mean)/std.
    # 6 frames in 2 segments of 3: the official test positions are frames 0 and 3.
    for t, frame in enumerate((0, 3)):
        for ch in range(3):
            values = sample["visual"][ch, t]
            assert float(values.std()) < 0.05
            restored = float(values.mean()) * IMAGENET_STD[ch] + IMAGENET_MEAN[ch]
            assert abs(restored - frame_intensity(frame) / 255) < 0.02


def test_batches_from_the_datamodule(cremad_root):
    root, _, lists = cremad_root
    dm = CremaDDataModule(str(root), num_frames=3, batch_size=3, num_workers=0, image_size=32)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["audio"].shape == (3, 1, 40, 128)
    assert batch["visual"].shape == (3, 3, 3, 32, 32)
    assert batch["label"].shape == (3,)
    # No val list: validation reads the test list, as the official code does.
    assert dm.dataset("val").clips == [clip for clip, _ in lists["test"]]


def test_rows_with_unknown_labels_or_missing_files_are_skipped(cremad_root):
    root, classes, lists = cremad_root
    with open(root / "train.csv", "a", newline="") as f:
        csv.writer(f).writerows([("ghost_clip", "ANG"), (lists["train"][0][0], "NOT_A_CLASS")])
    (root / "audio" / f"{lists['train'][1][0]}.npy").unlink()
    with pytest.warns(UserWarning, match="skipped rows"):
        ds = AVDataset(root, "train.csv", classes, train=True, image_size=32)
    assert ds.skipped == {"unknown label": 1, "missing audio": 2, "missing frames": 0}
    assert len(ds) == len(lists["train"]) - 1


def test_audio_length_crops_and_pads_and_pt_files_load(tmp_path):
    root = tmp_path / "r"
    lists = write_fake_av_dataset(root, classes=["A", "B"], audio_steps=30)
    clip = lists["train"][0][0]
    feats = torch.from_numpy(np.load(root / "audio" / f"{clip}.npy"))
    (root / "audio" / f"{clip}.npy").unlink()
    torch.save(feats, root / "audio" / f"{clip}.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the .pt file must be found, not skipped
        long = AVDataset(root, "train.csv", ["A", "B"], train=False, image_size=16, audio_length=50)
        short = AVDataset(root, "train.csv", ["A", "B"], train=False, image_size=16, audio_length=20)
    a = long[0]["audio"]
    assert a.shape == (1, 50, 128)
    assert torch.equal(a[0, :30], feats) and torch.count_nonzero(a[0, 30:]) == 0
    assert torch.equal(short[0]["audio"][0], feats[:20])


# ------------------------------------------------------------------------------------------ frame sampling
def test_sample_frame_indices_at_test_time_are_the_official_fixed_positions():
    # seg = F // n; official 1-based frame i*seg + max(seg//2, 1), here 0-based.
    assert sample_frame_indices(10, 2, train=False) == [1, 6]
    assert sample_frame_indices(9, 3, train=False) == [0, 3, 6]
    assert sample_frame_indices(30, 3, train=False) == [4, 14, 24]
    assert sample_frame_indices(7, 1, train=False) == [2]
    assert sample_frame_indices(2, 3, train=False) == [0, 0, 1]  # fewer frames than segments


def test_sample_frame_indices_in_training_are_random_within_each_segment():
    rng = random.Random(0)
    draws = [sample_frame_indices(12, 3, train=True, rng=rng) for _ in range(300)]
    for i in range(3):
        seen = {d[i] for d in draws}
        assert seen == set(range(4 * i, 4 * i + 4))  # every position of segment i, nothing outside
    with pytest.raises(ValueError):
        sample_frame_indices(0, 2, train=True)


def _decoded_frames(visual: torch.Tensor) -> list[int]:
    """Frame indices of a fake clip from the pixel values (see fake_data.frame_intensity)."""
    value = visual[0].mean(dim=(1, 2)) * IMAGENET_STD[0] + IMAGENET_MEAN[0]
    return [round((float(v) * 255 - 10) / 20) for v in value]


def test_loaded_frames_match_the_sampling_in_train_and_test(tmp_path):
    root = tmp_path / "f"
    write_fake_av_dataset(root, classes=["A"], clips_per_class=1, frames_per_clip=9)
    test_ds = AVDataset(root, "train.csv", ["A"], train=False, num_frames=3, image_size=32)
    assert _decoded_frames(test_ds[0]["visual"]) == [0, 3, 6]
    assert _decoded_frames(test_ds[0]["visual"]) == [0, 3, 6]  # fixed
    train_ds = AVDataset(root, "train.csv", ["A"], train=True, num_frames=3, image_size=32)
    random.seed(0)
    seen = [tuple(_decoded_frames(train_ds[0]["visual"])) for _ in range(40)]
    for picked in seen:
        assert [p // 3 for p in picked] == [0, 1, 2]  # one frame from each segment
    assert len(set(seen)) > 5  # and random within it


# ------------------------------------------------------------------------------------------ preprocessing
def test_preprocess_lists_for_cremad_names(tmp_path):
    root = tmp_path / "raw"
    names = [f"10{a:02d}_DFA_{emo}_XX" for a in range(5) for emo in ("ANG", "NEU", "SAD")]
    (root / "audio").mkdir(parents=True)
    for name in names:
        np.save(root / "audio" / f"{name}.npy", np.zeros((4, 128), np.float32))
        (root / "visual" / name).mkdir(parents=True)
    preprocess_av.main(["lists", "--root", str(root), "--dataset", "cremad", "--test-fraction", "0.2"])
    assert read_class_list(root / "stat.csv") == preprocess_av.CREMAD_CLASSES
    with open(root / "train.csv") as f:
        train = list(csv.reader(f))
    with open(root / "test.csv") as f:
        test = list(csv.reader(f))
    assert len(train) == 12 and len(test) == 3
    assert {c for c, _ in train}.isdisjoint(c for c, _ in test)
    assert {c for c, _ in train + test} == set(names)
    assert all(label == clip.split("_")[2] for clip, label in train + test)
    assert sorted(label for _, label in test) == ["ANG", "NEU", "SAD"]  # stratified


def test_preprocess_audio_uses_torchaudio_or_says_it_is_missing(tmp_path):
    wave = torch.sin(torch.linspace(0, 2000, 22050)).unsqueeze(0)
    try:
        import torchaudio  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="pip install torchaudio"):
            preprocess_av.compute_fbank(wave, 22050)
        with pytest.raises(SystemExit, match="torchaudio"):
            preprocess_av.main(["audio", "--input", str(tmp_path), "--output", str(tmp_path / "a")])
    else:
        feats = preprocess_av.compute_fbank(wave, 22050, duration=3.0)
        assert feats.shape == (298, 128) and feats.dtype == np.float32


def test_preprocess_frames_needs_ffmpeg(tmp_path, monkeypatch):
    monkeypatch.setattr(preprocess_av.shutil, "which", lambda name: None)
    (tmp_path / "v.mp4").write_bytes(b"")
    with pytest.raises(RuntimeError, match="ffmpeg"):
        preprocess_av.extract_frames(tmp_path, tmp_path / "visual")


def test_cremad_label_parsing():
    assert preprocess_av.cremad_label("1001_DFA_ANG_XX") == "ANG"
    with pytest.raises(ValueError):
        preprocess_av.cremad_label("1001_DFA_XYZ_XX")


def test_preprocess_script_runs_directly():
    out = subprocess.run(
        [sys.executable, str(REPO / "examples" / "preprocess_av.py"), "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "audio" in out.stdout and "frames" in out.stdout and "lists" in out.stdout


def test_configs_are_shipped():
    names = {p.name for p in CONFIG_DIR.glob("*.yaml")}
    assert {"cg_digits.yaml", "cg_digits_3mod.yaml", "cremad.yaml", "kinetics_sounds.yaml"} <= names
