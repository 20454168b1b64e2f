"""Official weight downloads (against a real local HTTP server) and the real offline ImageNet model."""
import hashlib

import numpy as np
import pytest
import torch

from bitlab.data import imagenet
from bitlab.eval.predict import predict_files
from bitlab.errors import BitlabError
from bitlab.io import DownloadError
from bitlab.models import checkpoints, create_model, zoo


@pytest.fixture
def served_npz(tmp_path, http_server):
    torch.manual_seed(0)
    path = checkpoints.save_npz(create_model("R14x0.5", num_classes=3), tmp_path / "src.npz")
    data = path.read_bytes()
    http_server.add("bit_models/BiT-M-R50x1.npz", data, goog_md5=True)  # name from the official table
    return data


def test_download_verifies_server_md5_and_writes_sha256(tmp_path, http_server, served_npz):
    out = zoo.download_weights("BiT-M-R50x1", tmp_path / "w", base_url=f"{http_server.url}/bit_models", progress=False)
    assert out.read_bytes() == served_npz
    sha = hashlib.sha256(served_npz).hexdigest()
    assert (tmp_path / "w" / "BiT-M-R50x1.npz.sha256").read_text().split()[0] == sha
    # a second call is satisfied from disk (checked against the recorded sha256), no request made
    n = len(http_server.requests)
    zoo.download_weights("BiT-M-R50x1", tmp_path / "w", base_url=f"{http_server.url}/bit_models", progress=False)
    assert len(http_server.requests) == n
    assert create_model("R14x0.5", num_classes=3, pretrained=out) is not None


def test_download_resumes_after_a_dropped_connection(tmp_path, http_server, served_npz):
    http_server.truncate["bit_models/BiT-M-R50x1.npz"] = 1
    out = zoo.download_weights("BiT-M-R50x1", tmp_path, base_url=f"{http_server.url}/bit_models", progress=False)
    assert out.read_bytes() == served_npz
    ranges = [r for _, p, r in http_server.requests if p.endswith(".npz")]
    assert ranges[0] is None and ranges[1] == f"bytes={len(served_npz) // 2}-"  # second request resumed


def test_corrupt_download_is_retried_then_refused(tmp_path, http_server, served_npz):
    url = f"{http_server.url}/bit_models"
    http_server.corrupt["bit_models/BiT-M-R50x1.npz"] = 1
    assert zoo.download_weights("BiT-M-R50x1", tmp_path, base_url=url, progress=False).read_bytes() == served_npz
    http_server.corrupt["bit_models/BiT-M-R50x1.npz"] = 99
    with pytest.raises(DownloadError, match=r"BiT-M-R50x1\.npz.*md5 mismatch"):
        zoo.download_weights("BiT-M-R50x1", tmp_path / "again", base_url=url, progress=False)
    assert not list((tmp_path / "again").glob("*.npz*"))  # nothing half-written left behind
    with pytest.raises(DownloadError, match=r"sha256 mismatch"):
        zoo.download_weights("BiT-M-R50x1", tmp_path / "pinned", base_url=url, sha256="0" * 64, progress=False)


def test_unknown_weights_name():
    with pytest.raises(Exception, match="unknown BiT weights 'BiT-X-R50x1'"):
        zoo.weights_url("BiT-X-R50x1")
    assert len(zoo.WEIGHT_NAMES) == 18 and zoo.weights_url("BiT-M-R50x1-ILSVRC2012").endswith("/BiT-M-R50x1-ILSVRC2012.npz")


@pytest.mark.parametrize("name", sorted(zoo.OFFLINE_MODELS))
def test_offline_imagenet_models_are_real(name, tmp_path, photos):
    import cv2

    paths = []
    for photo in ("chelsea", "coffee"):
        paths.append(tmp_path / f"{photo}.jpg")
        cv2.imwrite(str(paths[-1]), cv2.cvtColor(photos[photo], cv2.COLOR_RGB2BGR))
    model = create_model(name)
    pred = predict_files(model, paths, topk=5, progress=False)
    idx = imagenet.index_of()
    cats = {idx[w] for w in ("n02123045", "n02123159", "n02124075")}  # tabby, tiger cat, Egyptian cat
    assert pred.indices[0, 0] in cats
    assert imagenet.names()[pred.indices[1, 0]] == "espresso"
    # Real weights, not a lucky guess: random ones put about 0.001 on any class (Lite1: 0.48 here).
    assert np.all(np.diff(pred.probs, axis=1) <= 0) and pred.probs[1, 0] > 0.3


def test_offline_weights_are_checked_against_the_architecture(monkeypatch):
    lite0 = zoo.OFFLINE_MODELS["efficientnet_lite0.offline_in1k"]
    wrong = zoo.OfflineModel(lite0.package, "efficientnet_lite2")  # lite0 file, lite2 net
    monkeypatch.setitem(zoo.OFFLINE_MODELS, "mismatched", wrong)
    with pytest.raises(BitlabError, match=r"efficientnet-lite0-57934424\.pth: .*(tensors|shape)"):
        zoo.offline_model("mismatched")


def test_weights_cli_lists_and_downloads(tmp_path, http_server, served_npz, capsys):
    from bitlab.cli import main

    assert main(["weights", "list"]) == 0
    names = capsys.readouterr().out.split()
    assert names == list(zoo.WEIGHT_NAMES) and "BiT-M-R152x4-ILSVRC2012" in names
    url = f"{http_server.url}/bit_models"
    sha = hashlib.sha256(served_npz).hexdigest()
    assert main(["weights", "download", "BiT-M-R50x1", "--out", str(tmp_path), "--base-url", url, "--sha256", sha]) == 0
    assert (tmp_path / "BiT-M-R50x1.npz").read_bytes() == served_npz
    assert f"BiT-M-R50x1: {tmp_path / 'BiT-M-R50x1.npz'}" in capsys.readouterr().out
    # a wrong pin, an unknown name: exit 2 with the culprit named, nothing left behind
    assert main(["weights", "download", "BiT-M-R50x1", "--out", str(tmp_path / "bad"), "--base-url", url,
                 "--sha256", "0" * 64]) == 2
    assert "sha256 mismatch" in capsys.readouterr().err and not list((tmp_path / "bad").glob("*.npz*"))
    assert main(["weights", "download", "BiT-X-R50x1", "--out", str(tmp_path), "--base-url", url]) == 2
    assert "unknown BiT weights 'BiT-X-R50x1'" in capsys.readouterr().err


NPZ = "bit_models/BiT-M-R50x1.npz"


def _weights_cli(tmp_path, http_server, *extra):
    from bitlab.cli import main

    return main(["weights", "download", "BiT-M-R50x1", "--out", str(tmp_path / "w"),
                 "--base-url", f"{http_server.url}/bit_models", *extra])


def _left(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_a_body_cut_short_without_content_length_is_never_kept(tmp_path, http_server, served_npz, capsys):
    http_server.headers.pop(NPZ)  # no MD5 announced, no length: only the bytes themselves can tell
    http_server.no_length.add(NPZ)
    http_server.truncate[NPZ] = 99
    assert _weights_cli(tmp_path, http_server) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"error: {http_server.url}/{NPZ}: gave up after 3 attempts: the downloaded file: truncated or damaged zip" in err
    assert _left(tmp_path / "w") == []  # no .npz, no .sha256 sidecar, no .part
    http_server.truncate[NPZ] = 0
    assert _weights_cli(tmp_path, http_server) == 0
    assert (tmp_path / "w" / "BiT-M-R50x1.npz").read_bytes() == served_npz


def test_a_half_file_with_a_matching_sidecar_is_downloaded_again(tmp_path, http_server, served_npz, caplog):
    out = tmp_path / "w"
    out.mkdir()
    half = served_npz[: len(served_npz) // 2]  # what an earlier, unverified download kept
    (out / "BiT-M-R50x1.npz").write_bytes(half)
    (out / "BiT-M-R50x1.npz.sha256").write_text(f"{hashlib.sha256(half).hexdigest()}  BiT-M-R50x1.npz\n")
    zoo.download_weights("BiT-M-R50x1", out, base_url=f"{http_server.url}/bit_models", progress=False)
    assert (out / "BiT-M-R50x1.npz").read_bytes() == served_npz
    assert (out / "BiT-M-R50x1.npz.sha256").read_text().split()[0] == hashlib.sha256(served_npz).hexdigest()
    assert "not a whole BiT npz" in caplog.text


def test_an_html_page_never_becomes_the_npz(tmp_path, http_server, served_npz, capsys):
    http_server.add(NPZ, b"<!DOCTYPE html><html><body>Sign in to continue</body></html>")
    http_server.headers.pop(NPZ)
    assert _weights_cli(tmp_path, http_server) == 2
    err = capsys.readouterr().err
    assert "the downloaded file: not an npz archive (it starts with b'<!DOCTYP', an HTML or XML page" in err
    assert _left(tmp_path / "w") == []


def test_an_npz_that_is_not_a_bit_checkpoint_is_refused(tmp_path, http_server, capsys):
    import io as pyio

    buf = pyio.BytesIO()
    np.savez(buf, weights=np.zeros(3, np.float32))
    http_server.add(NPZ, buf.getvalue())
    assert _weights_cli(tmp_path, http_server) == 2
    assert "the downloaded file: unexpected key 'weights' (not in the official BiT schema)" in capsys.readouterr().err
    assert _left(tmp_path / "w") == []


def test_a_416_for_a_stale_longer_part_is_checked_against_the_real_size(tmp_path, http_server, served_npz):
    out = tmp_path / "w"
    out.mkdir()
    (out / "BiT-M-R50x1.npz.part").write_bytes(served_npz + b"left over from an older, longer file")
    assert _weights_cli(tmp_path, http_server) == 0
    assert (out / "BiT-M-R50x1.npz").read_bytes() == served_npz
    assert _left(out) == ["BiT-M-R50x1.npz", "BiT-M-R50x1.npz.sha256"]


def test_out_naming_a_file_and_the_size_cap(tmp_path, http_server, served_npz, capsys):
    from bitlab.cli import main

    (tmp_path / "weights.npz").write_bytes(b"x")
    assert main(["weights", "download", "BiT-M-R50x1", "--out", str(tmp_path / "weights.npz"),
                 "--base-url", f"{http_server.url}/bit_models"]) == 2
    err = capsys.readouterr().err
    assert f"bitlab weights download: error: --out {tmp_path / 'weights.npz'}: exists and is not a folder" in err
    assert http_server.requests == []
    assert _weights_cli(tmp_path, http_server, "--max-download", "10K") == 2
    assert f"announces {len(served_npz)} bytes, more than the download limit of 10240 bytes" in capsys.readouterr().err
    assert _left(tmp_path / "w") == []
