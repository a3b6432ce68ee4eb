"""The VM's one network interface: virtio-net on QEMU's user network, a tap device or a host bridge."""

from __future__ import annotations

import re
from dataclasses import field
from typing import TYPE_CHECKING, Any

from vgpuctl.base.errors import InvalidInput
from vgpuctl.vm.checks import one_of
from vgpuctl.vm.devices.base import MERGED, QemuContext, Record, XmlContext, options, spec_fields, spec_record

if TYPE_CHECKING:
    from vgpuctl.vm.spec import VmSpec

QEMU_POSITION = 60
XML_POSITION = 40
NETWORK_MODES = ("none", "user", "tap", "bridge")
BRIDGE_HELPER = "/usr/lib/qemu/qemu-bridge-helper"  # Debian's qemu-system-common
_MAC = r"[0-9a-f]{2}(:[0-9a-f]{2}){5}"
_IFNAME = r"[A-Za-z0-9_.-]{1,15}"  # Linux IFNAMSIZ - 1


@spec_record
class Network(Record):
    """The VM's one network interface."""

    mode: str = field(default="user", metadata={"choices": NETWORK_MODES})
    bridge: str | None = None  # mode bridge: the host bridge (through qemu-bridge-helper)
    ifname: str | None = None  # mode tap: an existing tap device; QEMU makes one when unset
    vhost: bool = True  # tap/bridge: use vhost-net when the host has /dev/vhost-net
    mac: str | None = None  # default: 52:54:00 + 3 bytes derived from the VM name (stable, distinct)


TABLES: tuple[type[Any], ...] = (Network,)


@spec_fields
class Fields:
    network: Network = field(default_factory=Network, metadata=MERGED)


def default_mac(name: str) -> str:
    """52:54:00 (QEMU's prefix) and three bytes of the name's hash: stable per VM, distinct between VMs."""
    import hashlib  # loads OpenSSL (~2 ms): only when a MAC is made, not at every start

    digest = hashlib.sha256(f"vgpuctl:{name}".encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in digest[:3])


def check(spec: VmSpec) -> None:
    net = spec.network
    one_of("network.mode", net.mode, NETWORK_MODES)
    if net.mode == "bridge" and not net.bridge:
        raise InvalidInput("network.mode = 'bridge' needs network.bridge (the host bridge, e.g. br0)")
    if net.bridge is not None and (net.mode != "bridge" or not re.fullmatch(_IFNAME, net.bridge)):
        raise InvalidInput(f"network.bridge must be an interface name and needs network.mode = 'bridge', "
                           f"got {net.bridge!r}")
    if net.ifname is not None and (net.mode != "tap" or not re.fullmatch(_IFNAME, net.ifname)):
        raise InvalidInput(f"network.ifname must be an interface name and needs network.mode = 'tap', "
                           f"got {net.ifname!r}")
    if net.mac is not None and not re.fullmatch(_MAC, net.mac):
        raise InvalidInput(f"network.mac must look like 52:54:00:12:34:56 (lower case), got {net.mac!r}")


def qemu_args(ctx: QemuContext) -> list[str]:
    spec, net = ctx.spec, ctx.spec.network
    if net.mode == "none":
        return []
    vhost = None
    if net.mode in ("tap", "bridge") and net.vhost:
        if ctx.vhost_net:
            vhost = "on"
        else:
            ctx.notes.append("no /dev/vhost-net on this host: networking without vhost-net (slower)")
    if net.mode == "user":
        argv = ["-netdev", "user,id=n0"]
    elif net.mode == "tap":
        argv = ["-netdev", options("tap,id=n0", ifname=net.ifname, script="no", downscript="no", vhost=vhost)]
    else:
        argv = ["-netdev", options("tap,id=n0", br=net.bridge, helper=BRIDGE_HELPER, vhost=vhost)]
    nic = options("virtio-net-pci,netdev=n0", mac=net.mac or default_mac(spec.name))
    return [*argv, "-device", nic + (",romfile=" if spec.fast_boot else "")]  # fast boot: no PXE ROM


def xml(ctx: XmlContext) -> None:
    spec, net = ctx.spec, ctx.spec.network
    if net.mode == "none":
        return
    kind = {"user": "user", "tap": "ethernet", "bridge": "bridge"}[net.mode]
    interface = ctx.add(ctx.devices, "interface", type=kind)
    ctx.add(interface, "mac", address=net.mac or default_mac(spec.name))
    if net.mode == "bridge":
        ctx.add(interface, "source", bridge=net.bridge or "")
    if net.mode == "tap" and net.ifname:
        ctx.add(interface, "target", dev=net.ifname, managed="no")
    ctx.add(interface, "model", type="virtio")
    if net.mode in ("tap", "bridge"):
        ctx.add(interface, "driver", name="vhost" if net.vhost else "qemu")
    if spec.fast_boot:
        ctx.add(interface, "rom", enabled="no")
