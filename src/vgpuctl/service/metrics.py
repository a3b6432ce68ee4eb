"""``GET /metrics``: Prometheus text, read from the host and the state directory at each scrape.

==================================  ==================  ===============================================
metric                              labels              what
==================================  ==================  ===============================================
``vgpuctl_vgpus``                   parent, type        active vGPUs (every type listed, 0 included)
``vgpuctl_vgpus_defined``           parent, type        persistent definitions (mdevctl's files)
``vgpuctl_available_instances``     parent, type        how many more of the type can be created now
``vgpuctl_pool_free``               parent, pool        free capacity of a GVT-g pool
``vgpuctl_pool_total``              parent, pool        what vGPUs may use of the pool in all
``vgpuctl_sriov_vfs_total``         pf, backend         VFs the PF may have (``sriov_totalvfs``)
``vgpuctl_sriov_vfs_enabled``       pf, backend         VFs enabled now (absent while ``sriov_numvfs``
                                                        does not answer: a disable waits for a VM)
``vgpuctl_sriov_vfs_free``          pf, backend         enabled VFs on their VFIO driver that no VM
                                                        holds or has open (NVIDIA: with no type set)
``vgpuctl_sriov_vfs_held``          pf, backend         VFs a VM of vgpuctl's runs on or someone has open
``vgpuctl_vms``                     state               VMs per state (running, paused, shutdown,
                                                        stopped, crashed; every state listed)
``vgpuctl_stream_fps``              vm                  frames per second sent to the VM's viewers
``vgpuctl_stream_viewers``          vm                  viewers of the VM's display stream
``vgpuctl_unreadable_files``        kind                files vgpuctl cannot read: ``definition`` (an
                                                        mdevctl definition), ``vm_spec`` (a VM's TOML)
``vgpuctl_collect_errors``          source              1 when that part could not be read
==================================  ==================  ===============================================

Pools are ``low GM (aperture)`` and ``high GM`` (MiB), ``fences`` and ``vGPU ids`` (counts).

**The streaming hook.** The display streaming code reports per VM, from any thread::

    from vgpuctl.service import metrics
    metrics.report_stream("car1", fps=29.7, viewers=2)   # whenever its numbers change (e.g. each second)
    metrics.clear_stream("car1")                        # when the VM's last viewer has gone

``metrics.stream_stats`` (``dict[str, StreamStats]``, a ``(fps, viewers)`` named tuple per VM name)
holds what was reported; a scrape exports exactly its entries.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator
from typing import NamedTuple

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from vgpuctl.base.state import StateDir
from vgpuctl.host import HostRoot

log = logging.getLogger("vgpuctl.service")

VM_STATES = ("running", "paused", "shutdown", "stopped", "crashed")


class StreamStats(NamedTuple):
    fps: float
    viewers: int


stream_stats: dict[str, StreamStats] = {}
_stream_lock = threading.Lock()


def report_stream(vm: str, fps: float, viewers: int) -> None:
    """The display stream of ``vm`` now runs at ``fps`` frames per second to ``viewers`` viewers."""
    with _stream_lock:
        stream_stats[vm] = StreamStats(float(fps), int(viewers))


def clear_stream(vm: str) -> None:
    """``vm`` has no stream any more: its series disappear from /metrics."""
    with _stream_lock:
        stream_stats.pop(vm, None)


class HostCollector(Collector):
    """Reads vGPUs, pools and VMs at scrape time (no cache: a scrape sees what the CLI just did)."""

    def __init__(self, root: HostRoot, state: StateDir) -> None:
        self.root, self.state = root, state

    def collect(self) -> Iterable[Metric]:
        errors = GaugeMetricFamily("vgpuctl_collect_errors", "1 when that part of the host could not be read",
                                   labels=["source"])
        for source, part in (("vgpus", self._vgpus), ("vfs", self._vfs), ("vms", self._vms),
                             ("streams", self._streams), ("problems", self._problems)):
            try:
                yield from list(part())
                errors.add_metric([source], 0)
            except Exception as e:  # one unreadable part must not lose the others
                log.warning("metrics: reading %s failed: %s", source, e)
                errors.add_metric([source], 1)
        yield errors

    def _vgpus(self) -> Iterator[Metric]:
        from vgpuctl.backends import backend_for_parent
        from vgpuctl.backends.gvt_capacity import GvtCapacity
        from vgpuctl.mdev import definitions
        from vgpuctl.mdev.sysfs import active_devices, read_parents

        active = GaugeMetricFamily("vgpuctl_vgpus", "Active vGPUs per parent and type", labels=["parent", "type"])
        defined = GaugeMetricFamily("vgpuctl_vgpus_defined", "Defined (persistent) vGPUs per parent and type",
                                    labels=["parent", "type"])
        available = GaugeMetricFamily("vgpuctl_available_instances",
                                      "vGPUs of the type that can still be created on the parent",
                                      labels=["parent", "type"])
        free = GaugeMetricFamily("vgpuctl_pool_free", "Free capacity of a GVT-g pool (MiB, or a count)",
                                 labels=["parent", "pool"])
        total = GaugeMetricFamily("vgpuctl_pool_total", "Capacity of a GVT-g pool vGPUs may use (MiB, or a count)",
                                  labels=["parent", "pool"])
        devices = active_devices(self.root)
        definitions_by_key: dict[tuple[str, str], int] = {}
        for d in definitions.load_all(self.root):
            definitions_by_key[(d.parent, d.mdev_type)] = definitions_by_key.get((d.parent, d.mdev_type), 0) + 1
        for parent in read_parents(self.root):
            for t in parent.types:
                key = (parent.name, t.type_id)
                active.add_metric(list(key), sum(1 for d in devices if (d.parent, d.type_id) == key))
                defined.add_metric(list(key), definitions_by_key.pop(key, 0))
                available.add_metric(list(key), t.available_instances)
            capacity = backend_for_parent(parent.types).capacity(self.root, parent.name, parent.types)
            for pool in capacity.pools if isinstance(capacity, GvtCapacity) else []:
                free.add_metric([parent.name, pool.name], pool.free)
                total.add_metric([parent.name, pool.name], pool.total)
        for key, count in definitions_by_key.items():  # definitions of parents or types not present now
            defined.add_metric(list(key), count)
        yield from (active, defined, available, free, total)

    def _vfs(self) -> Iterator[Metric]:
        from vgpuctl.vm.inventory import vf_listing

        labels = ["pf", "backend"]
        total = GaugeMetricFamily("vgpuctl_sriov_vfs_total", "VFs the SR-IOV PF may have (sriov_totalvfs)",
                                  labels=labels)
        enabled = GaugeMetricFamily("vgpuctl_sriov_vfs_enabled", "VFs enabled on the SR-IOV PF", labels=labels)
        free = GaugeMetricFamily("vgpuctl_sriov_vfs_free", "Enabled VFs on their VFIO driver that no VM holds",
                                 labels=labels)
        held = GaugeMetricFamily("vgpuctl_sriov_vfs_held", "VFs a VM runs on or someone has open", labels=labels)
        for row in vf_listing(self.root, self.state):
            key = [row["pf"], row["backend"]]
            vfs = row["vfs"]
            taken = [vf for vf in vfs if vf["vm"] or vf["opened_by"]]
            total.add_metric(key, row["total_vfs"])
            if row["enabled_vfs"] is not None:
                enabled.add_metric(key, row["enabled_vfs"])
            free.add_metric(key, sum(1 for vf in vfs if vf not in taken and vf["driver"] == row["vfio_driver"]
                                     and not vf.get("vgpu_type")))
            held.add_metric(key, len(taken))
        yield from (total, enabled, free, held)

    def _problems(self) -> Iterator[Metric]:
        from vgpuctl.service.problems import unreadable_files

        found = unreadable_files(self.root, self.state)
        unreadable = GaugeMetricFamily("vgpuctl_unreadable_files", "Files vgpuctl cannot read (each is reported "
                                       "at /api/v1/problems)", labels=["kind"])
        for kind in ("definition", "vm_spec"):
            unreadable.add_metric([kind], sum(1 for f in found if f["kind"] == kind))
        yield unreadable

    def _vms(self) -> Iterator[Metric]:
        from vgpuctl.vm import lifecycle
        from vgpuctl.vm import spec as specs

        counts = dict.fromkeys(VM_STATES, 0)
        for name in specs.names(self.state):
            state = lifecycle.status(self.root, self.state, name).state
            counts[state] = counts.get(state, 0) + 1
        vms = GaugeMetricFamily("vgpuctl_vms", "VMs per state", labels=["state"])
        for state, count in counts.items():
            vms.add_metric([state], count)
        yield vms

    def _streams(self) -> Iterator[Metric]:
        fps = GaugeMetricFamily("vgpuctl_stream_fps", "Frames per second of the VM's display stream", labels=["vm"])
        viewers = GaugeMetricFamily("vgpuctl_stream_viewers", "Viewers of the VM's display stream", labels=["vm"])
        with _stream_lock:
            current = dict(stream_stats)
        for vm, stats in sorted(current.items()):
            fps.add_metric([vm], stats.fps)
            viewers.add_metric([vm], stats.viewers)
        yield from (fps, viewers)


def make_registry(root: HostRoot, state: StateDir) -> CollectorRegistry:
    """A registry of its own per app (no process-global state: several apps may live in one process)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(HostCollector(root, state))
    return registry


def render(registry: CollectorRegistry) -> tuple[bytes, str]:
    """The exposition text and its content type."""
    return generate_latest(registry), CONTENT_TYPE_LATEST
