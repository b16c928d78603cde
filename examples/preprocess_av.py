"""Turn raw CREMA-D / Kinetics-Sounds media into the layout the example data modules read.

Three steps, each a sub-command (run ``python examples/preprocess_av.py <step> --help``)::

    # 1. log-mel fbank (T x 128) per clip -> ROOT/audio/<clip>.npy   (needs torchaudio)
    python examples/preprocess_av.py audio  --input RAW/AudioWAV --output ROOT/audio
    # 2. frames per clip -> ROOT/visual/<clip>/frame_00001.jpg ...  (needs the ffmpeg program)
    python examples/preprocess_av.py frames --input RAW/VideoFlash --output ROOT/visual --fps 1
    # 3. class list + train/test lists -> ROOT/stat.csv, ROOT/train.csv, ROOT/test.csv
    python examples/preprocess_av.py lists  --root ROOT --dataset cremad

The audio features follow the original pipeline: mono waveform resampled to ``--sample-rate``
(16 kHz), tiled and cut to ``--duration`` seconds (3 s for CREMA-D, as the authors tile their clips),
mean removed, then ``torchaudio.compliance.kaldi.fbank`` with 128 mel bins, a Hanning window,
10 ms shift, HTK compatibility, no energy and no dither. If you already have the authors' list
files, copy them into ROOT instead of running step 3.
"""

from __future__ import annotations

import argparse
import csv
import random
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

CREMAD_CLASSES: list[str] = ["NEU", "HAP", "SAD", "FEA", "DIS", "ANG"]
"""CREMA-D emotion classes in the official label order (label id = position)."""

AUDIO_INPUTS = (".wav", ".flac", ".mp3", ".mp4", ".flv", ".mkv", ".webm", ".avi")
VIDEO_INPUTS = (".mp4", ".flv", ".mkv", ".webm", ".avi", ".mov")


def _require_torchaudio():
    try:
        import torchaudio
        import torchaudio.compliance.kaldi
    except ImportError as err:
        raise ImportError(
            "computing log-mel fbank features needs torchaudio (the original pipeline uses "
            "torchaudio.compliance.kaldi.fbank): pip install torchaudio  (matching your torch version)"
        ) from err
    return torchaudio


def _require_ffmpeg() -> str:
    exe = shutil.which("ffmpeg")
    if exe is None:
        raise RuntimeError(
            "the ffmpeg program is needed to decode videos (apt-get install ffmpeg, or conda install ffmpeg)"
        )
    return exe


def compute_fbank(
    waveform,
    sample_rate: int,
    target_rate: int = 16000,
    duration: float | None = 3.0,
    num_mel_bins: int = 128,
) -> np.ndarray:
    """Log-mel fbank of a waveform as in the original pipeline.

    Args:
        waveform: ``(channels, samples)`` float tensor.
        sample_rate: Sample rate of ``waveform``.
        target_rate: Rate to resample to before the fbank.
        duration: Tile (repeat) and cut the waveform to this many seconds; ``None`` keeps its length.
        num_mel_bins: Mel bins (128 in the paper's setting).

    Returns:
        float32 array of shape ``(T, num_mel_bins)`` (T = 298 for 3 s at a 10 ms shift).
    """
    torchaudio = _require_torchaudio()
    import torch

    wav = torch.as_tensor(waveform, dtype=torch.float32)
    if wav.dim() == 1:
        wav = wav.unsqueeze(0)
    wav = wav.mean(dim=0, keepdim=True)
    if sample_rate != target_rate:
        wav = torchaudio.functional.resample(wav, sample_rate, target_rate)
    if duration is not None:
        n = round(duration * target_rate)
        if wav.shape[1] == 0:
            raise ValueError("empty waveform")
        reps = -(-n // wav.shape[1])
        wav = wav.repeat(1, reps)[:, :n]
    wav = wav - wav.mean()
    fbank = torchaudio.compliance.kaldi.fbank(
        wav,
        htk_compat=True,
        sample_frequency=target_rate,
        use_energy=False,
        window_type="hanning",
        num_mel_bins=num_mel_bins,
        dither=0.0,
        frame_shift=10,
    )
    return fbank.numpy().astype(np.float32)


def _load_audio(path: Path):
    torchaudio = _require_torchaudio()
    if path.suffix.lower() in (".wav", ".flac", ".mp3"):
        return torchaudio.load(str(path))
    # Containers (mp4/flv/...) go through ffmpeg so that no torchaudio video backend is needed.
    ffmpeg = _require_ffmpeg()
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "audio.wav"
        subprocess.run(
            [ffmpeg, "-loglevel", "error", "-y", "-i", str(path), "-vn", "-ac", "1", str(wav)], check=True
        )
        return torchaudio.load(str(wav))


def _inputs(input_path: Path, extensions: Sequence[str]) -> list[Path]:
    if input_path.is_file():
        return [input_path]
    files = sorted(p for p in input_path.iterdir() if p.suffix.lower() in extensions)
    if not files:
        raise FileNotFoundError(f"no {'/'.join(extensions)} files in {input_path}")
    return files


def extract_audio(
    input_path: Path,
    output_dir: Path,
    sample_rate: int = 16000,
    duration: float | None = 3.0,
    num_mel_bins: int = 128,
    fmt: str = "npy",
    overwrite: bool = False,
) -> int:
    """Write ``output_dir/<clip>.<fmt>`` fbank features for every media file in ``input_path``.

    Args:
        input_path: A media file or a directory of them.
        output_dir: Destination (``ROOT/audio``).
        sample_rate: Resampling rate.
        duration: Seconds to tile/cut to (``None``: whole clip).
        num_mel_bins: Mel bins.
        fmt: ``"npy"`` (numpy array) or ``"pt"`` (torch tensor).
        overwrite: Recompute existing files.

    Returns:
        Number of files written.
    """
    _require_torchaudio()
    output_dir.mkdir(parents=True, exist_ok=True)
    written = 0
    for path in _inputs(input_path, AUDIO_INPUTS):
        out = output_dir / f"{path.stem}.{fmt}"
        if out.exists() and not overwrite:
            continue
        waveform, rate = _load_audio(path)
        feats = compute_fbank(waveform, rate, sample_rate, duration, num_mel_bins)
        if fmt == "pt":
            import torch

            torch.save(torch.from_numpy(feats), out)
        else:
            np.save(out, feats)
        written += 1
    return written


def extract_frames(input_path: Path, output_dir: Path, fps: float = 1.0, overwrite: bool = False) -> int:
    """Extract ``fps`` frames per second of every video into ``output_dir/<clip>/frame_%05d.jpg``.

    Args:
        input_path: A video file or a directory of them.
        output_dir: Destination (``ROOT/visual``).
        fps: Frames per second to keep.
        overwrite: Re-extract clips whose folder already has frames.

    Returns:
        Number of clips processed.
    """
    ffmpeg = _require_ffmpeg()
    done = 0
    for path in _inputs(input_path, VIDEO_INPUTS):
        clip_dir = output_dir / path.stem
        if clip_dir.is_dir() and any(clip_dir.iterdir()) and not overwrite:
            continue
        clip_dir.mkdir(parents=True, exist_ok=True)
        cmd = [ffmpeg, "-loglevel", "error", "-y", "-i", str(path), "-vf", f"fps={fps}", "-q:v", "2"]
        subprocess.run([*cmd, str(clip_dir / "frame_%05d.jpg")], check=True)
        done += 1
    return done


def cremad_label(clip: str) -> str:
    """Emotion of a CREMA-D clip from its name ``ActorID_Sentence_EMOTION_Level`` (e.g. ``1001_DFA_ANG_XX``).

    Args:
        clip: Clip name without extension.

    Returns:
        The emotion code (one of :data:`CREMAD_CLASSES`).
    """
    parts = clip.split("_")
    if len(parts) < 3 or parts[2] not in CREMAD_CLASSES:
        raise ValueError(f"not a CREMA-D clip name: {clip!r}")
    return parts[2]


def write_lists(
    root: Path,
    dataset: str = "cremad",
    labels_file: Path | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    audio_dir: str = "audio",
    train_name: str | None = None,
    test_name: str | None = None,
) -> dict[str, int]:
    """Write ``stat.csv`` and a label-stratified random train/test split of the clips found in ``root``.

    Only clips that have both ``audio/<clip>.npy|.pt`` and frames in ``visual/<clip>/`` are listed.

    Args:
        root: Dataset root holding ``audio/`` and ``visual/``.
        dataset: ``"cremad"`` (labels from clip names, official class order) or ``"kinetics_sounds"``.
        labels_file: ``clip,label`` rows; required unless ``dataset == "cremad"``.
        test_fraction: Fraction of each class put in the test list.
        seed: Seed of the split.
        audio_dir: Fbank directory relative to ``root``.
        train_name: Training list name (default ``train.csv`` for CREMA-D, ``train.txt`` otherwise).
        test_name: Test list name (default ``test.csv`` / ``test.txt``).

    Returns:
        ``{"train": n, "test": n, "classes": n}``.
    """
    ext = "csv" if dataset == "cremad" else "txt"
    train_name = train_name or f"train.{ext}"
    test_name = test_name or f"test.{ext}"
    clips = sorted(
        p.stem
        for p in (root / audio_dir).iterdir()
        if p.suffix in (".npy", ".pt") and (root / "visual" / p.stem).is_dir()
    )
    if not clips:
        raise FileNotFoundError(
            f"no clip with both {root / audio_dir}/<clip>.npy and {root / 'visual'}/<clip>/"
        )
    if dataset == "cremad":
        labels = {clip: cremad_label(clip) for clip in clips}
        classes = list(CREMAD_CLASSES)
    else:
        if labels_file is None:
            raise ValueError("--labels is required for datasets other than cremad")
        with open(labels_file, newline="") as f:
            given = {row[0].strip(): row[1].strip() for row in csv.reader(f) if len(row) >= 2}
        labels = {clip: given[clip] for clip in clips if clip in given}
        classes = sorted(set(labels.values()))
    rng = random.Random(seed)
    train, test = [], []
    for cls in classes:
        members = [c for c in labels if labels[c] == cls]
        rng.shuffle(members)
        n_test = round(len(members) * test_fraction)
        test += [(c, cls) for c in members[:n_test]]
        train += [(c, cls) for c in members[n_test:]]
    with open(root / "stat.csv", "w", newline="") as f:
        csv.writer(f).writerows([c] for c in classes)
    for name, rows in ((train_name, train), (test_name, test)):
        with open(root / name, "w", newline="") as f:
            csv.writer(f).writerows(sorted(rows))
    return {"train": len(train), "test": len(test), "classes": len(classes)}


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry point (see the module docstring).

    Args:
        argv: Arguments without the program name (default: ``sys.argv[1:]``).
    """
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="step", required=True)

    p_audio = sub.add_parser("audio", help="log-mel fbank features (needs torchaudio)")
    p_audio.add_argument(
        "--input", type=Path, required=True, help="media file or directory (wav, mp4, flv, ...)"
    )
    p_audio.add_argument("--output", type=Path, required=True, help="ROOT/audio")
    p_audio.add_argument("--sample-rate", type=int, default=16000)
    p_audio.add_argument("--duration", type=float, default=3.0, help="seconds to tile/cut to; <= 0 keeps all")
    p_audio.add_argument("--num-mel-bins", type=int, default=128)
    p_audio.add_argument("--format", choices=["npy", "pt"], default="npy")
    p_audio.add_argument("--overwrite", action="store_true")

    p_frames = sub.add_parser("frames", help="JPEG frames per clip (needs ffmpeg)")
    p_frames.add_argument("--input", type=Path, required=True, help="video file or directory")
    p_frames.add_argument("--output", type=Path, required=True, help="ROOT/visual")
    p_frames.add_argument("--fps", type=float, default=1.0, help="frames kept per second of video")
    p_frames.add_argument("--overwrite", action="store_true")

    p_lists = sub.add_parser("lists", help="stat.csv and train/test lists")
    p_lists.add_argument("--root", type=Path, required=True)
    p_lists.add_argument("--dataset", choices=["cremad", "kinetics_sounds"], default="cremad")
    p_lists.add_argument("--labels", type=Path, default=None, help="clip,label CSV (kinetics_sounds)")
    p_lists.add_argument("--test-fraction", type=float, default=0.2)
    p_lists.add_argument("--seed", type=int, default=0)

    args = parser.parse_args(argv)
    try:
        if args.step == "audio":
            duration = args.duration if args.duration > 0 else None
            n = extract_audio(
                args.input,
                args.output,
                args.sample_rate,
                duration,
                args.num_mel_bins,
                args.format,
                args.overwrite,
            )
            print(f"wrote {n} feature files to {args.output}")
        elif args.step == "frames":
            n = extract_frames(args.input, args.output, args.fps, args.overwrite)
            print(f"extracted frames of {n} clips into {args.output}")
        else:
            counts = write_lists(args.root, args.dataset, args.labels, args.test_fraction, args.seed)
            print(
                f"wrote stat.csv ({counts['classes']} classes), "
                f"{counts['train']} train and {counts['test']} test clips"
            )
    except (ImportError, RuntimeError, FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
