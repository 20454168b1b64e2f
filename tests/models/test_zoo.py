"""Official weight downloads and the weights cache, timm's hub weights (against real local HTTP servers,
one speaking the hub's protocol), and the real offline ImageNet models."""
import hashlib
import io
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from bitlab import paths
from bitlab.data import imagenet
from bitlab.eval.predict import predict_files
from bitlab.errors import BitlabError
from bitlab.fileio import DownloadError
from bitlab.models import checkpoints, create_model, zoo
from tests.fixtures.processes import ENV


@pytest.fixture
def served_npz(tmp_path, http_server):
    torch.manual_seed(0)
    path = checkpoints.save_npz(create_model("R14x0.5", num_classes=3, pretrained=False), tmp_path / "src.npz")
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
    *rows, where = capsys.readouterr().out.splitlines()
    assert [r.split()[:2] for r in rows] == [[name, "missing"] for name in zoo.WEIGHT_NAMES]  # an empty cache
    assert f"official BiT weights: {paths.weights_dir()}" in where
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


# ----------------------------------------------------------------------------- pretrained by default
@pytest.fixture(scope="module")
def r50_npz() -> bytes:
    """A real BiT-M-R50x1-shaped npz (official schema, no head), in float16 to halve it (47 MB)."""
    torch.manual_seed(0)
    arrays = checkpoints.state_dict_to_npz(create_model("R50x1", num_classes=0, pretrained=False).state_dict())
    buf = io.BytesIO()
    np.savez(buf, **{k: v.astype(np.float16) for k, v in arrays.items()})
    return buf.getvalue()


def test_official_weights_download_on_first_use_then_come_from_the_cache(tmp_path, http_server, r50_npz,
                                                                         monkeypatch, caplog):
    """An official name is pretrained by default: the first use fetches `<name>.npz` into the cache
    (the bucket's MD5 checked, the sha256 recorded), later uses read the cache with no server at all,
    and a cached file damaged since is found by its sha256 and fetched again."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("BITLAB_CACHE", str(cache))
    monkeypatch.setenv("BITLAB_WEIGHTS_URL", f"{http_server.url}/bit_models")
    http_server.add(NPZ, r50_npz, goog_md5=True)
    model = create_model("BiT-M-R50x1", num_classes=10)
    file = cache / "weights" / "BiT-M-R50x1.npz"
    assert file.read_bytes() == r50_npz and http_server.requests == [("GET", NPZ, None)]
    assert (cache / "weights" / "BiT-M-R50x1.npz.sha256").read_text().split()[0] == hashlib.sha256(r50_npz).hexdigest()
    with np.load(io.BytesIO(r50_npz)) as served:  # the served weights, not random ones
        root = torch.from_numpy(served[checkpoints.ROOT_NPZ_KEY].astype(np.float32).transpose(3, 2, 0, 1))
    assert torch.equal(model.root.conv.weight, root)

    http_server.close()
    assert torch.equal(create_model("BiT-M-R50x1", num_classes=10).root.conv.weight, root)

    mirror = type(http_server)(tmp_path / "mirror")  # the bucket, up again
    try:
        mirror.root.mkdir()
        mirror.add(NPZ, r50_npz, goog_md5=True)
        monkeypatch.setenv("BITLAB_WEIGHTS_URL", f"{mirror.url}/bit_models")
        damaged = bytearray(file.read_bytes())
        damaged[len(damaged) // 2] ^= 0xFF
        file.write_bytes(bytes(damaged))
        with caplog.at_level("WARNING"):
            again = create_model("BiT-M-R50x1", num_classes=10)
        assert "its sha256 differs from BiT-M-R50x1.npz.sha256; downloading it again" in caplog.text
        assert file.read_bytes() == r50_npz and mirror.requests == [("GET", NPZ, None)]
        assert torch.equal(again.root.conv.weight, root)
    finally:
        mirror.close()


def test_offline_an_official_name_fails_at_once_saying_how_to_go_on(tmp_path, monkeypatch, capsys):
    """No network (the suite's bucket URL refuses connections) and nothing cached: one clear error
    naming the model, the URL, the cache and both ways on; nothing is left in the cache."""
    from bitlab.cli import main

    cache = tmp_path / "cache"
    monkeypatch.setenv("BITLAB_CACHE", str(cache))
    url = f"{os.environ['BITLAB_WEIGHTS_URL']}/BiT-M-R50x1-ILSVRC2012.npz"
    start = time.monotonic()
    with pytest.raises(zoo.WeightsUnavailable) as e:
        create_model("BiT-M-R50x1-ILSVRC2012")
    assert time.monotonic() - start < 30  # three refused connections, no timeouts
    for part in ("BiT-M-R50x1-ILSVRC2012: its pretrained weights are not in the cache and cannot be fetched",
                 url, f"cached in {cache / 'weights'}", "`bitlab weights download BiT-M-R50x1-ILSVRC2012` on a machine "
                 "with internet access", "--pretrained FILE", "--random-init (pretrained=False)"):
        assert part in str(e.value), part
    assert [p for p in cache.rglob("*") if p.is_file()] == []
    data = tmp_path / "data" / "n02123045"
    data.mkdir(parents=True)
    (data / "cat.png").write_bytes(b"unused: the model fails first")
    assert main(["evaluate", "--model", "BiT-M-R50x1-ILSVRC2012", "--data", str(data.parent),
                 "--out", str(tmp_path / "ev")]) == 2
    err = capsys.readouterr().err
    assert "bitlab evaluate: error: BiT-M-R50x1-ILSVRC2012: its pretrained weights" in err and "Traceback" not in err
    assert not (tmp_path / "ev").exists()


def test_names_without_released_weights_need_a_file_or_random_init():
    with pytest.raises(BitlabError, match=r"R50x1 names an architecture, and no weights were released for it: give "
                                          r"a weights file with --pretrained FILE .* or --random-init"):
        create_model("R50x1")
    with torch.device("meta"):
        assert create_model("R50x1", pretrained=False).num_classes == 1000
    with pytest.raises(BitlabError, match=r"unknown model 'resnet18.nonsense': Invalid pretrained tag"):
        create_model("resnet18.nonsense", pretrained=False)


HUB_MODEL = "test_resnet.r160_in1k"  # timm's 0.5 M-parameter test ResNet; its real weights live on the hub


def test_timm_weights_come_through_the_hub_into_its_cache_and_work_offline_from_a_copy(tmp_path, http_server):
    """A local server speaking the hub's protocol (HF_ENDPOINT): `bitlab weights download NAME` on the
    "connected machine" fetches the model's files into huggingface_hub's cache (HEAD for metadata,
    then GET); a copy of that cache works with the server gone and HF_HUB_OFFLINE set, and the model
    built there holds exactly the served weights."""
    import safetensors.torch
    import timm

    torch.manual_seed(0)
    served = timm.create_model(HUB_MODEL, pretrained=False).state_dict()
    data = safetensors.torch.save(served)
    rel = f"timm/{HUB_MODEL}/resolve/main/model.safetensors"  # what huggingface_hub asks the endpoint for
    http_server.add(rel, data)
    http_server.headers[rel] = {"X-Repo-Commit": "c0ffee" + "0" * 34, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}
    connected = {**ENV, "HF_ENDPOINT": http_server.url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run([sys.executable, "-m", "bitlab", "weights", "download", HUB_MODEL], env=connected,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{HUB_MODEL}: timm's weights (timm/{HUB_MODEL}) in {tmp_path / 'hf' / 'hub'}" in done.stdout
    assert [r[:2] for r in http_server.requests if r[1] == rel] == [("HEAD", rel), ("GET", rel)]
    http_server.close()

    shutil.copytree(tmp_path / "hf", tmp_path / "copied")
    offline = {**ENV, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "copied")}
    saved = tmp_path / "built.pt"
    script = f"import bitlab, torch; torch.save(bitlab.create_model({HUB_MODEL!r}).state_dict(), {str(saved)!r})"
    built = subprocess.run([sys.executable, "-c", script], env=offline, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-3000:]
    got = torch.load(saved, weights_only=True)
    assert got.keys() == served.keys() and all(torch.equal(got[k], served[k]) for k in served)
    listed = subprocess.run([sys.executable, "-m", "bitlab", "weights", "list"], env=offline, capture_output=True,
                            text=True, timeout=300)
    assert f"timm/{HUB_MODEL}" in listed.stdout and "cached" in listed.stdout.split(f"timm/{HUB_MODEL}")[1]


def test_weights_download_of_a_timm_name_takes_no_bit_options(capsys):
    from bitlab.cli import main

    assert main(["weights", "download", "resnet18.a1_in1k", "--out", "w"]) == 2
    assert "resnet18.a1_in1k: --out applies to official BiT weights only" in capsys.readouterr().err
    assert main(["weights", "download", "R50x1"]) == 2
    assert "R50x1 names an architecture" in capsys.readouterr().err
