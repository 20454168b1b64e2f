"""ILSVRC-2012's class list, read from timm's files without importing timm."""
import subprocess
import sys

from bitlab.data import imagenet


def test_the_class_list_is_timms_imagenet_info():
    from timm.data import ImageNetInfo

    info = ImageNetInfo("imagenet-1k")
    assert imagenet.wnids() == tuple(info.label_names())
    assert imagenet.descriptions() == tuple(info.index_to_description(i) for i in range(1000))
    assert imagenet.names()[281] == "tabby" and imagenet.index_of()["n02123045"] == 281
    assert list(imagenet.wnids()) == sorted(imagenet.wnids())  # the standard order: sorted wnids


def test_reading_the_class_list_does_not_import_timm():
    code = ("import sys; from bitlab.data import imagenet; imagenet.descriptions(); imagenet.index_of(); "
            "print('timm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
