"""``choose.explain_path``: the path ``p2pkv doctor`` reports per holder, and why, follows the
transport's own rule (``TransportChoice.path``) for every combination of facts. Pure."""

from __future__ import annotations

import itertools

import pytest

from p2pkv.transport.base import TransportChoice
from p2pkv.transport.choose import explain_path

TCP = TransportChoice(False, "configured: tcp")
SHM = TransportChoice(True, "configured: shm for same-host peers, tcp for the others")
AUTO_GPU = TransportChoice(True, "auto: ucx for pulls into GPU memory, shm for same-host "
                                 "peers, tcp otherwise", True, False)
AUTO_CPU = TransportChoice(True, "auto: shm for same-host peers, tcp for the others (ucx: not "
                                 "worth it without a GPU or RDMA)")
UCX = TransportChoice(False, "configured: ucx for every pull", True, True)


@pytest.mark.parametrize("choice", [TCP, SHM, AUTO_GPU, AUTO_CPU, UCX])
def test_the_explained_path_is_the_transports_own(choice):
    for offers, same, mapped, gpu, device in itertools.product([False, True], repeat=5):
        mapped = mapped and same and choice.same_host  # a slab maps only on one host
        got = explain_path(choice, peer_offers_ucx=offers, same_host=same, slab_mapped=mapped,
                           slab_reason="" if mapped else "it runs on another host",
                           to_gpu=gpu, holder_serves_device=device)
        rule = choice.path(peer_offers_ucx=offers, slab_mapped=mapped, to_gpu=gpu)
        want = {"ucx": {"cuda_ipc", "ucx-device"} if gpu else {"ucx-host"}}.get(rule, {rule})
        assert got.path in want and got.why, (choice, offers, same, mapped, gpu, device, got)


def test_cpu_paths_say_why():
    shm = explain_path(SHM, peer_offers_ucx=False, same_host=True, slab_mapped=True)
    assert (shm.path, shm.why) == ("shm", "same host: its slab maps here")
    other = explain_path(SHM, peer_offers_ucx=False, same_host=False, slab_mapped=False,
                         slab_reason="it runs on another host")
    assert (other.path, other.why) == ("tcp", "it runs on another host")
    tcp = explain_path(TCP, peer_offers_ucx=True, same_host=True, slab_mapped=False)
    assert (tcp.path, tcp.why) == ("tcp", "this host uses tcp (configured: tcp)")
    host = explain_path(UCX, peer_offers_ucx=True, same_host=False, slab_mapped=False)
    assert host.path == "ucx-host" and "configured: ucx" in host.why


def test_gpu_paths_name_device_memory_and_why_not_cuda_ipc():
    # a same-host holder serving its host store: UCX into device memory, not cuda_ipc
    near = explain_path(AUTO_GPU, peer_offers_ucx=True, same_host=True, slab_mapped=True,
                        to_gpu=True)
    assert near.path == "ucx-device" and "not cuda_ipc" in near.why
    ipc = explain_path(AUTO_GPU, peer_offers_ucx=True, same_host=True, slab_mapped=True,
                       to_gpu=True, holder_serves_device=True)
    assert ipc.path == "cuda_ipc"
    far = explain_path(AUTO_GPU, peer_offers_ucx=True, same_host=False, slab_mapped=False,
                       slab_reason="it runs on another host", to_gpu=True)
    assert far.path == "ucx-device" and "another host" in far.why
    # a holder without UCX: its slab, staged through page-locked memory, and the doctor says so
    old = explain_path(AUTO_GPU, peer_offers_ucx=False, same_host=True, slab_mapped=True,
                       to_gpu=True)
    assert old.path == "shm" and "page-locked" in old.why and "offers no UCX" in old.why
    # no UCX on this host at all (ucxx missing): tcp, and why UCX is not used
    bare = TransportChoice(True, "auto: shm for same-host peers, tcp for the others (ucx: "
                                 "ucxx is not usable here)")
    miss = explain_path(bare, peer_offers_ucx=True, same_host=False, slab_mapped=False,
                        slab_reason="it runs on another host", to_gpu=True)
    assert miss.path == "tcp" and "ucxx is not usable" in miss.why
