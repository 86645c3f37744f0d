import json
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch

from omni_core.eval.retrieval import DIRECTIONS, recall_at_k


def test_recall_at_k_counts_ranks():
    q = torch.eye(4)
    perfect = recall_at_k(q, q)
    assert perfect == {"R@1": 1.0, "R@5": 1.0, "R@10": 1.0}
    shifted = recall_at_k(q, q.roll(1, dims=0))  # every partner ranks below another candidate
    assert shifted["R@1"] == 0.0 and shifted["R@5"] == 1.0


@pytest.fixture(scope="module")
def run(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    subprocess.run([sys.executable, "-m", "omni_core.cli", "pretrain", "--data", str(dataset), "--out", str(out),
                    "--steps", "2", "--batch-size", "8", "--no-progress"], check=True, capture_output=True)
    return out


def test_eval_json_has_six_directions_with_chance(dataset, run):
    out = subprocess.run([sys.executable, "-m", "omni_core.cli", "eval", "--run", str(run), "--data", str(dataset),
                          "--json"], check=True, capture_output=True, text=True).stdout
    result = json.loads(out)
    assert result["num_eval"] == 8
    for query, target in DIRECTIONS:
        row = result[f"{query}->{target}"]
        for key in ("R@1", "R@5", "R@10", "chance"):
            assert 0.0 <= row[key] <= 1.0
        assert row["R@1"] <= row["R@5"] <= row["R@10"]
        assert row["chance"] == pytest.approx(1 / 8)


def test_embed_images_audio_and_text(dataset, run, tmp_path):
    folder, clips = tmp_path / "images", tmp_path / "clips"
    folder.mkdir()
    clips.mkdir()
    with tarfile.open(next(dataset.glob("eval-*.tar"))) as tar:
        for m in tar.getmembers():
            target = folder if m.name.endswith(".jpg") else clips if m.name.endswith(".flac") else None
            if target is not None:
                (target / m.name).write_bytes(tar.extractfile(m).read())
    (folder / "broken.jpg").write_bytes(b"not an image")
    captions = tmp_path / "captions.txt"
    captions.write_text("a red circle on the left\na blue square at the top\n")
    for flag, src, n in (("--images", folder, 8), ("--audio", clips, 8), ("--text", captions, 2)):
        out = tmp_path / f"{flag[2:]}.npy"
        proc = subprocess.run([sys.executable, "-m", "omni_core.cli", "embed", "--run", str(run), flag, str(src),
                               "--out", str(out)], check=True, capture_output=True, text=True)
        emb = np.load(out)
        assert emb.shape[0] == n and np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
        if flag == "--images":
            assert "broken.jpg" in proc.stderr and "1 files skipped" in proc.stdout


def test_embed_names_every_skipped_file_when_none_decodes(run, tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    for name in ("a.jpg", "b.png"):
        (folder / name).write_bytes(b"not an image")
    proc = subprocess.run([sys.executable, "-m", "omni_core.cli", "embed", "--run", str(run), "--images", str(folder),
                           "--out", str(tmp_path / "x.npy")], capture_output=True, text=True)
    assert proc.returncode == 1
    assert "a.jpg" in proc.stderr and "b.png" in proc.stderr and "all 2 files were skipped" in proc.stderr
    assert not (tmp_path / "x.npy").exists()
