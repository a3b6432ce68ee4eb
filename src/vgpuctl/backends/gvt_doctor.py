"""The doctor's checks for Intel GVT-g: the iGPU and its platform, the kernel's GVT-g options and modules,
i915's parameters (enable_gvt, GuC), the mdev types kvmgt registers and the BIOS aperture they fit in.

The engine and the host-wide checks (KVM, VFIO, QEMU) are in :mod:`vgpuctl.host.doctor`; this module adds
what only a GVT-g host needs, and says "not needed" on hosts whose vGPUs come from elsewhere.
"""

from __future__ import annotations

from functools import cached_property

from vgpuctl.backends.gvt_capacity import gvt_allows
from vgpuctl.backends.gvt_platforms import HOST_LOW_GM_MIB, INTEL_VENDOR_ID, MAX_VGPUS_PER_GPU, Platform, platform_for
from vgpuctl.backends.sriov_intel import SRIOV_BY_PLATFORM, SRIOV_FIX, intel_pfs
from vgpuctl.host import facts
from vgpuctl.host.doctor import (
    Check,
    CheckSpec,
    Context,
    Host,
    describe_pci,
    kernel_param_fix,
    see_param,
)
from vgpuctl.host.root import HostRoot

IGPU = "0000:00:02.0"  # where every Intel iGPU sits (bus 0, device 2, function 0)
IGPU_DIR = HostRoot().pci_device(IGPU)

APERTURE_ADVICE_MIB = 1024  # the aperture that fits the most small vGPUs (7) with a 4 GiB GGTT
# gvt-linux issue #216: GVT-g init on Comet Lake broke in 5.19.x
GVT_INIT_HINT = ("GVT-g device init failed inside i915: look for 'Fail to init GVT device' or "
                 "'Unsupported device' with: dmesg | grep -iE 'gvt|kvmgt' (5.19.x on Comet Lake: "
                 "'assign a handler to a non-tracked mmio 4ab8', gvt-linux #216)")


GVTD_FIX = (f"No vGPU sharing on this GPU. Only GVT-d is left: bind {IGPU} to vfio-pci and pass the whole iGPU "
            "to one VM (the host loses it).")


class GvtFacts:
    """What the GVT-g checks read of the iGPU, each once (one per doctor run: ``ctx.facts(GvtFacts)``)."""

    def __init__(self, host: Host) -> None:
        self.host = host

    @cached_property
    def igpu(self) -> tuple[int, int, int] | None:
        return self.host.pci_id(IGPU)

    @cached_property
    def platform(self) -> Platform | None:
        if self.igpu is None or self.igpu[0] != INTEL_VENDOR_ID:
            return None
        return platform_for(self.igpu[1])

    @cached_property
    def aperture_mib(self) -> int | None:
        """BIOS aperture = size of BAR2 (GMADR)."""
        text = self.host.read(f"{IGPU_DIR}/resource")
        return facts.parse_bar_size_mib(text, 2) if text else None

    @cached_property
    def mdev_types(self) -> dict[str, int | None] | None:
        """The iGPU's mdev types and their available_instances; None without mdev_supported_types."""
        base = f"{IGPU_DIR}/mdev_supported_types"
        names = self.host.listdir(base)
        if names is None:
            return None
        return {name: facts.as_int(self.host.value(f"{base}/{name}/available_instances")) for name in names}

    def other_mdev_parents(self) -> list[tuple[str, str]]:
        """(parent, driver) of the mdev parents that are not an Intel iGPU."""
        return [(parent, driver) for parent, vendor, driver in self.host.mdev_parents() if vendor != INTEL_VENDOR_ID]


def _max_vgpus(allowed: list[tuple[str, int]]) -> int:
    return min(max((count for _, count in allowed), default=0), MAX_VGPUS_PER_GPU)


def _allows_text(allowed: list[tuple[str, int]]) -> str:
    return ", ".join(f"{name} x{count}" for name, count in allowed) or "no type"


# ====================================================================== the checks


def check_igpu(ctx: Context, c: Check) -> None:
    host, gvt = ctx.host, ctx.facts(GvtFacts)
    ids = gvt.igpu
    others = gvt.other_mdev_parents()
    if (ids is None or ids[0] != INTEL_VENDOR_ID) and others:
        c.see(IGPU_DIR, "absent" if ids is None else describe_pci(ids))
        c.see(host.root.sys_class_mdev_bus, ", ".join(f"{p} ({d})" for p, d in others))
        c.not_applicable = f"no Intel iGPU; this host's vGPUs come from {', '.join(sorted({d for _, d in others}))}"
        c.set("skip", f"No Intel iGPU, so no GVT-g: not needed here, this host's vGPUs come from other mdev "
                      f"parents ({', '.join(f'{p}: {d}' for p, d in others)}; see mdev-parents).")
        return

    sriov = [pf.address for pf in intel_pfs(host.root)]
    if sriov:
        c.see(f"{host.root.pci_device(sriov[0])}/sriov_totalvfs", "present: an Intel GPU with SR-IOV")
        c.not_applicable = f"this host's Intel vGPUs are SR-IOV VFs of {', '.join(sriov)}"
        c.set("skip", f"Not needed: {', '.join(sriov)} has the SR-IOV capability, so its vGPUs are SR-IOV VFs "
                      "(see the sriov-* checks), not GVT-g.")
        return

    def other_gpus() -> None:
        found = []
        for address in host.listdir(host.root.sys_bus_pci_devices) or []:
            pci = host.pci_id(address)
            if pci and pci[2] >> 16 == 0x03:
                found.append(f"{address} {describe_pci(pci)}")
        c.see(f"{host.root.sys_bus_pci_devices}/*/class", "display controllers: " + ("; ".join(found) or "none"))

    if ids is None:
        c.see(IGPU_DIR, "absent")
        other_gpus()
        c.set("fail", f"No Intel iGPU: there is no PCI device at {IGPU}, where Intel iGPUs sit. GVT-g needs an "
                      "Intel CPU with integrated graphics from Broadwell (5th gen Core) to Comet Lake (10th gen).",
              "No software fix: run vgpuctl on a host with a Broadwell ... Comet Lake Intel iGPU.")
        return
    vendor, device, pci_class = ids
    c.see(f"{IGPU_DIR}/vendor", f"0x{vendor:04x}")
    c.see(f"{IGPU_DIR}/device", f"0x{device:04x}")
    c.see(f"{IGPU_DIR}/class", f"0x{pci_class:06x}")
    if vendor != INTEL_VENDOR_ID:
        other_gpus()
        c.set("fail", f"No Intel iGPU: {IGPU} is {describe_pci(ids)}. GVT-g needs an Intel iGPU from "
                      "Broadwell (5th gen Core) to Comet Lake (10th gen).",
              "No software fix: run vgpuctl on a host with a Broadwell ... Comet Lake Intel iGPU.")
        return
    platform = gvt.platform
    if platform is None:
        c.set("fail", f"Intel device 0x{device:04x} at {IGPU} is not a GPU that GVT-g knows: it is "
                      f"{describe_pci(ids)}.",
              "No software fix: GVT-g supports Broadwell, Skylake, Apollo Lake, Kaby Lake, Coffee Lake and "
              "Comet Lake iGPUs only.")
        return
    name = platform.name.split(" (")[0]
    c.see("platform (gvt-platforms.json)", f"{name}, graphics version {platform.graphics_ver}")
    release = host.release or "unknown"
    c.see(host.root.proc_osrelease, release)
    if not platform.gvt_supported:
        if platform.graphics_ver >= 11:
            route = SRIOV_BY_PLATFORM.get(name)
            if route:
                c.set("fail", f"{name} (Gen{platform.graphics_ver}) has no GVT-g: GVT-g ends with Comet Lake "
                              f"(Gen9), and Intel's vGPU for Gen{platform.graphics_ver} is SR-IOV instead. The "
                              "iGPU offers up to 7 virtual functions (PCI 0000:00:02.1-02.7), each a whole PCI "
                              "device given to one VM with vfio-pci: no mdev, no mdev types. Upstream i915 has no "
                              f"SR-IOV for client iGPUs; it comes from {route}.", SRIOV_FIX)
            else:
                c.set("fail", f"{name} (Gen{platform.graphics_ver}) has no GVT-g (it ends with Comet Lake, Gen9) "
                              "and no SR-IOV either.", GVTD_FIX)
        else:
            c.set("fail", f"{name} is not supported by GVT-g: i915's is_supported_device() accepts only "
                          "Broadwell, Skylake, Broxton/Apollo Lake, Kaby Lake, Coffee Lake and Comet Lake.",
                  "No software fix on this iGPU.")
        return
    since = platform.gvt_since
    assert since is not None
    if host.version is not None and not platform.gvt_supported_on(host.version, device):
        needs = ".".join(map(str, since))
        partial = ""
        if platform.gvt_partial and host.version >= platform.gvt_partial[0]:
            ids_text = ", ".join(f"0x{i:04X}" for i in sorted(platform.gvt_partial[1]))
            partial = f" (Linux {platform.gvt_partial[0][0]}.{platform.gvt_partial[0][1]} accepts only {ids_text})"
        c.set("fail", f"{name} is supported by GVT-g from Linux {needs}; this kernel is {release}{partial}, whose "
                      f"i915 refuses GVT-g on 0x{device:04x}.",
              f"Boot a kernel >= {needs} built with the GVT-g options (see kernel-config), e.g. a distribution "
              "kernel of Linux 6.1 or later with CONFIG_DRM_I915_GVT_KVMGT=m.")
        return
    prefix = "GVTg_V4" if platform.graphics_ver == 8 else "GVTg_V5"
    detail = (f"{name} (Gen{platform.graphics_ver}) iGPU, supported by GVT-g since Linux "
              f"{since[0]}.{since[1]}; its vGPU types are i915-{prefix}_*.")
    ctx.kinds.append("GVT-g")
    if host.version is None:
        c.set("warn", detail + f" The running kernel's version is unknown (no {host.root.proc_osrelease}).")
    elif host.version < (4, 16):
        c.set("warn", detail + f" But Linux {release} predates the vGPU display (dma-buf, QEMU display=on, "
                               "Linux 4.16): guests run, their screen cannot be shown by QEMU.",
              "Boot a kernel >= 4.16 (any current distribution kernel with the GVT-g options).")
    else:
        c.set("ok", detail)


def kconfig_required(host: Host) -> list[tuple[str, str]]:
    """(symbol, accepted values) a GVT-g host kernel needs, by era (spec 4.1)."""
    required = [("CONFIG_DRM_I915", "my"), ("CONFIG_DRM_I915_GVT", "y"), ("CONFIG_DRM_I915_GVT_KVMGT", "my"),
                ("CONFIG_VFIO", "my"), ("CONFIG_VFIO_IOMMU_TYPE1", "my"), ("CONFIG_VFIO_MDEV", "my")]
    if not host.at_least(5, 14):
        required.append(("CONFIG_VFIO_MDEV_DEVICE", "my"))
    required += [("CONFIG_KVM", "my"), ("CONFIG_KVM_INTEL", "my")]
    return required


def kconfig_fragment(host: Host) -> str:
    """The Kconfig lines that give this kernel era a GVT-g host (spec 4.1)."""
    era = host.release or "this kernel"
    lines = [f"# gvt.config: Intel GVT-g (KVMGT) host, Linux {era}", "CONFIG_DRM_I915=m"]
    if host.at_least(5, 19):
        lines.append("CONFIG_DRM_I915_GVT_KVMGT=m  # selects DRM_I915_GVT (hidden since 5.19)")
    else:
        lines += ["CONFIG_DRM_I915_GVT=y", "CONFIG_DRM_I915_GVT_KVMGT=m"]
    lines += ["CONFIG_VFIO=m"]
    if host.at_least(6, 6):
        lines.append("CONFIG_VFIO_GROUP=y")
    lines += ["CONFIG_VFIO_IOMMU_TYPE1=m", "CONFIG_VFIO_MDEV=m"]
    if not host.at_least(5, 14):
        lines.append("CONFIG_VFIO_MDEV_DEVICE=m")
    lines += ["CONFIG_KVM=m", "CONFIG_KVM_INTEL=m", "CONFIG_INTEL_IOMMU=y"]
    return "\n".join(lines)


def kconfig_fix(host: Host) -> str:
    return ("Build the kernel with this fragment (in the kernel tree: scripts/kconfig/merge_config.sh .config "
            "gvt.config && make olddefconfig && make -j$(nproc) bindeb-pkg), install it and reboot:\n"
            + kconfig_fragment(host))


def required_modules(host: Host) -> list[tuple[str, str]]:
    """(module, its Kconfig symbol) a GVT-g host has loaded or built in, by era (spec 4.2)."""
    modules = [("i915", "CONFIG_DRM_I915"), ("kvmgt", "CONFIG_DRM_I915_GVT_KVMGT"), ("mdev", "CONFIG_VFIO_MDEV")]
    if not host.at_least(5, 14):
        modules.append(("vfio_mdev", "CONFIG_VFIO_MDEV_DEVICE"))
    modules += [("vfio", "CONFIG_VFIO"), ("vfio_iommu_type1", "CONFIG_VFIO_IOMMU_TYPE1"), ("kvm", "CONFIG_KVM"),
                ("kvm_intel", "CONFIG_KVM_INTEL")]
    return modules


def check_kernel_config(ctx: Context, c: Check) -> None:
    host = ctx.host
    if host.kconfig is not None:
        source, config = host.kconfig
        missing = []
        for symbol, accepted in kconfig_required(host):
            value = config.get(symbol)
            c.see(source, f"{symbol}={value}" if value not in (None, "n") else f"{symbol} is not set")
            if value is None or value not in accepted:
                missing.append(symbol)
        if host.at_least(6, 6) and config.get("CONFIG_VFIO_GROUP") == "n":
            c.see(source, "CONFIG_VFIO_GROUP is not set")
            missing.append("CONFIG_VFIO_GROUP")  # no /dev/vfio/<group>, which QEMU's vfio-pci opens
        if missing:
            c.set("fail", f"The kernel {host.release} lacks {', '.join(missing)} (read from {source}).",
                  kconfig_fix(host))
        else:
            c.set("ok", f"The kernel has GVT-g, KVMGT, VFIO, mdev and KVM for Intel (read from {source}).")
        return
    files = host.module_files
    base = host.root.lib_modules(host.release or "")
    if files is None:
        c.see(host.root.kernel_config(host.release or ""), "absent")
        c.see(host.root.proc_config_gz, "absent")
        c.see(f"{base}/modules.dep", "absent")
        c.set("warn", "Cannot tell how the kernel was configured: there is no kernel config file and no "
                      "module list for it.", "Check that your kernel has these options:\n" + kconfig_fragment(host))
        return
    builtin, dep = files
    missing = []
    for module, _symbol in required_modules(host):
        if module in builtin:
            c.see(f"{base}/modules.builtin", f"{module}: {builtin[module]}")
        elif module in dep:
            c.see(f"{base}/modules.dep", f"{module}: {dep[module]}")
        else:
            c.see(f"{base}/modules.dep", f"{module}: absent")
            missing.append(module)
    detail = (f"No kernel config to read ({host.root.kernel_config(host.release or '')}, {host.root.proc_config_gz}); "
              "judged from the "
              "kernel's module files.")
    if missing:
        c.set("fail", f"The kernel {host.release} has no {', '.join(missing)} module. " + detail, kconfig_fix(host))
    else:
        c.set("ok", "The kernel has every module GVT-g needs. " + detail)


def check_enable_gvt(ctx: Context, c: Check) -> None:
    host = ctx.host
    sysfs_path = host.root.module_parameter("i915", "enable_gvt")
    cmd, modprobe, runtime = see_param(host, c, "i915", "enable_gvt")
    if runtime is not None:
        c.see(sysfs_path, runtime)
    elif host.denied(sysfs_path):
        c.see(sysfs_path, "(root only: run as root to read it)")
    elif "i915" in host.loaded:
        c.see(sysfs_path, "absent: i915 built without CONFIG_DRM_I915_GVT")
    else:
        c.see(sysfs_path, "absent: i915 not loaded")
    configured = facts.kstrtobool(cmd) or (modprobe is not None and facts.kstrtobool(modprobe[0]))
    persist = (kernel_param_fix(host, "i915.enable_gvt=1")
               + "\nor: echo 'options i915 enable_gvt=1' > /etc/modprobe.d/i915-gvt.conf && update-initramfs -u && "
               "reboot")
    on_now = facts.kstrtobool(runtime)
    if configured and on_now is not False:
        tail = "" if on_now else " (i915 not loaded, or the parameter is not readable: not confirmed in effect)"
        c.set("ok", "i915.enable_gvt=1 is set" + tail + ".")
    elif configured:
        if cmd is not None and facts.kstrtobool(cmd) and not host.at_least(5, 8):
            c.set("fail", "i915.enable_gvt=1 is on the command line, but i915 reset it to N: on this kernel that "
                          "means GVT-g init failed.", "dmesg | grep -iE 'gvt|i915'  # then fix what it reports")
        else:
            where = modprobe[1] if modprobe else host.root.proc_cmdline
            c.set("fail", f"i915.enable_gvt=1 is configured in {where} but not in effect: "
                          "i915 was loaded without it (e.g. from an initramfs made before).",
                  "update-initramfs -u && reboot")
    elif on_now:
        c.set("warn", "GVT-g is enabled in the running i915 but not configured anywhere: lost at the next boot.",
              persist)
    else:
        c.set("fail", "i915.enable_gvt=1 is not set: i915 does not start GVT-g (the parameter defaults to off and "
                      "cannot be changed while i915 is loaded).", persist)


def check_guc(ctx: Context, c: Check) -> None:
    host = ctx.host
    sysfs_path = host.root.module_parameter("i915", "enable_guc")
    cmd, modprobe, runtime = see_param(host, c, "i915", "enable_guc")
    if runtime is not None:
        c.see(sysfs_path, runtime)
    legacy = host.cmdline_param("i915.enable_guc_submission")
    if legacy is not None:
        c.see(host.root.proc_cmdline, f"i915.enable_guc_submission={legacy}")
    # What i915 uses: the running value, else what it will be given at the next load.
    value = facts.as_int(runtime) if runtime is not None else facts.as_int(cmd) if cmd is not None else (
        facts.as_int(modprobe[0]) if modprobe else None)
    submission = value is not None and value > 0 and bool(value & 1)
    if legacy is not None and (facts.kstrtobool(legacy) or (facts.as_int(legacy) or 0) > 0):
        submission = True
    if not submission:
        shown = "auto: no GuC submission before Gen12" if value in (None, -1) else f"{value}"
        c.set("ok", f"GuC submission is not requested (enable_guc={shown}).")
        return
    grub = host.root.etc_default_grub
    where = modprobe[1] if modprobe and cmd is None else grub
    if where == grub:
        fix = ("sed -i -e 's/i915.enable_guc=[0-9-]*/i915.enable_guc=0/' -e 's/i915.enable_guc_submission=[^ \"]*//' "
               "/etc/default/grub && update-grub && reboot  # or enable_guc=2 to keep loading the HuC")
    else:
        fix = f"sed -i 's/enable_guc=[0-9-]*/enable_guc=0/' {where} && update-initramfs -u && reboot"
    c.set("fail", f"GuC submission is requested (enable_guc={value if value is not None else legacy}); GVT-g "
                  "refuses to start with it ('Graphics virtualization is not yet supported with GuC submission'). "
                  "Bit 1 (value 1 or 3) asks for submission; 2 (HuC loading only) is fine.", fix)


def check_iommu(ctx: Context, c: Check) -> None:
    host = ctx.host
    cmd = host.cmdline_param("intel_iommu")
    units = host.listdir(host.root.sys_class_iommu) or []
    c.see(host.root.proc_cmdline, f"intel_iommu={cmd}" if cmd is not None else "no intel_iommu")
    c.see(host.root.sys_class_iommu, " ".join(units) or "empty")
    note = ("Recommended by Intel's and ArchWiki's GVT-g guides, not required: mdevs get an emulated IOMMU group and "
            "GVT-g maps guest pages through the DMA API.")
    if units:
        c.set("ok", f"The IOMMU is on ({', '.join(units)}).")
    elif cmd is not None and cmd.split(",")[0] == "on":
        c.set("warn", "intel_iommu=on is given but no IOMMU is active: VT-d is off in the firmware, or the kernel "
                      "lacks CONFIG_INTEL_IOMMU. " + note,
              "Enable 'VT-d' (Intel Virtualization Technology for Directed I/O) in the firmware setup.")
    else:
        c.set("warn", "The IOMMU (VT-d) is off. " + note, kernel_param_fix(host, "intel_iommu=on"))


def check_modules(ctx: Context, c: Check) -> None:
    host = ctx.host
    missing = []
    for module, symbol in required_modules(host):
        if module in host.loaded:
            state = "loaded"
        elif host.builtin(module, symbol):
            state = "built in"
        else:
            state = "not loaded"
            missing.append(module)
        c.see(host.root.proc_modules, f"{module}: {state}")
    if not missing:
        c.set("ok", "Every module GVT-g needs is loaded or built in: "
                    + ", ".join(m for m, _ in required_modules(host)) + ".")
        return
    notes = []
    if "kvmgt" in missing and not host.at_least(5, 19):
        notes.append("On this kernel 'modprobe kvmgt' fails with 'No such device' until i915 has started GVT-g "
                     "(i915.enable_gvt=1, no GuC submission).")
    kvm_vendor = "kvm_intel"
    if kvm_vendor in missing and "vmx" not in host.cpu_flags:
        notes.append("kvm_intel cannot load without VT-x (no vmx in /proc/cpuinfo: see cpu-virt).")
    names = " ".join(m for m in missing if m != "i915")  # udev loads i915 for the iGPU by itself
    fixes = ["modprobe i915 enable_gvt=1"] if "i915" in missing else []
    if names:
        fixes += [f"modprobe -a {names}",
                  f"printf '%s\\n' {names} > /etc/modules-load.d/vgpuctl.conf  # load them at every boot"]
    fix = "\n".join(fixes)
    c.set("fail", f"Not loaded: {', '.join(missing)}. " + " ".join(notes), fix)


def check_mdev_types(ctx: Context, c: Check) -> None:
    host = ctx.host
    gvt = ctx.facts(GvtFacts)
    base = f"{IGPU_DIR}/mdev_supported_types"
    types = gvt.mdev_types
    if types:
        for name, available in types.items():
            c.see(f"{base}/{name}/available_instances", available if available is not None else "unreadable")
        class_link = f"{host.root.sys_class_mdev_bus}/{IGPU}"
        c.see(class_link, "present" if host.exists(class_link) else "absent")
        c.set("ok", f"kvmgt registered {len(types)} vGPU type{'s' * (len(types) != 1)}: {', '.join(types)}.")
        return
    c.see(base, "empty" if types is not None else "absent")
    if "kvmgt" not in host.loaded and not host.builtin("kvmgt", "CONFIG_DRM_I915_GVT_KVMGT"):
        c.see(host.root.proc_modules, "kvmgt: not loaded")
        c.blocked_by = "modules"
        c.set("skip", "Skipped: kvmgt is not loaded (see modules), and it is kvmgt that registers the mdev types.")
        return
    c.see(host.root.proc_modules, "kvmgt: loaded")
    causes: list[tuple[str, str | None]] = []
    enable, guc = ctx.checks.get("enable-gvt"), ctx.checks.get("guc")
    if enable and enable.status == "fail":
        causes.append(("i915.enable_gvt=1 is not in effect (see enable-gvt)", enable.fix))
    if guc and guc.status == "fail":
        causes.append(("GuC submission is requested (see guc)", guc.fix))
    aperture = gvt.aperture_mib
    if aperture is not None and gvt.platform and not gvt_allows(aperture, host.version, gvt.platform.graphics_ver):
        causes.append((f"the BIOS aperture is {aperture} MiB: GVT-g keeps {HOST_LOW_GM_MIB} MiB for the host, so no "
                       "vGPU type fits (see aperture)", _aperture_fix(gvt)))
    causes.append((GVT_INIT_HINT, "dmesg | grep -iE 'gvt|kvmgt'"))
    listed = "; ".join(f"({n}) {text}" for n, (text, _) in enumerate(causes, 1))
    c.set("fail", f"kvmgt is loaded but registered no mdev types, so no vGPU can be created. Likely causes: {listed}.",
          causes[0][1])


def _aperture_fix(gvt: GvtFacts) -> str:
    graphics_ver = gvt.platform.graphics_ver if gvt.platform else 9
    better = gvt_allows(APERTURE_ADVICE_MIB, gvt.host.version, graphics_ver)
    return (f"In the firmware setup (often Chipset > Graphics Configuration), set 'Aperture Size' to "
            f"{APERTURE_ADVICE_MIB} MiB: then {_allows_text(better)} (at most {_max_vgpus(better)} vGPUs).")


def check_aperture(ctx: Context, c: Check) -> None:
    host, gvt = ctx.host, ctx.facts(GvtFacts)
    aperture = gvt.aperture_mib
    if aperture is None:
        c.see(f"{IGPU_DIR}/resource", "no BAR2 (line 3)")
        c.set("warn", "Cannot read the iGPU's aperture (BAR2 size): the vGPU capacity is unknown.",
              f"lspci -vv -s {IGPU} | grep 'Region 2'  # the size=... shown is the aperture")
        return
    graphics_ver = gvt.platform.graphics_ver if gvt.platform else 9
    allowed = gvt_allows(aperture, host.version, graphics_ver)
    most = _max_vgpus(allowed)
    c.see(f"{IGPU_DIR}/resource", f"BAR2 {aperture} MiB")
    c.see(f"GVT-g types at {aperture} MiB (spec 2.4)", _allows_text(allowed))
    types = gvt.mdev_types or {}
    for name, available in types.items():
        c.see(f"{IGPU_DIR}/mdev_supported_types/{name}/available_instances", available)
    fit = f"{aperture} MiB aperture: {_allows_text(allowed)} on an idle GPU"
    if not allowed:
        c.set("fail", f"{fit}. GVT-g keeps {HOST_LOW_GM_MIB} MiB of the aperture for the host and the smallest "
                      "vGPU needs 64 MiB more, so no vGPU type is registered.", _aperture_fix(gvt))
    elif most <= 2:
        c.set("warn", f"{fit}: at most {most} vGPU{'s' * (most != 1)} at once. A larger aperture allows more.",
              _aperture_fix(gvt))
    elif types and all(available == 0 for available in types.values()):
        c.set("warn", f"{fit}; every type shows available_instances 0 now: the vGPUs in use hold all of it.",
              "vgpuctl list  # remove vGPUs you no longer need, or raise the aperture: " + _aperture_fix(gvt))
    else:
        extra = ""
        if aperture >= 2048:
            extra = (" A 2 GiB aperture shrinks the hidden pool: the largest type is listed but fits 0 times; "
                     f"{APERTURE_ADVICE_MIB} MiB gives the most vGPUs.")
        c.set("ok", f"{fit}: up to {most} vGPUs.{extra}")


CHECKS: tuple[CheckSpec, ...] = (
    CheckSpec("igpu", "Intel iGPU supported by GVT-g on this kernel", check_igpu),
    CheckSpec("kernel-config", "Kernel built with GVT-g, KVMGT, VFIO, mdev, KVM", check_kernel_config, ("igpu",)),
    CheckSpec("enable-gvt", "i915.enable_gvt=1", check_enable_gvt, ("igpu",)),
    CheckSpec("guc", "No GuC submission (i915.enable_guc)", check_guc, ("igpu",)),
    CheckSpec("iommu", "IOMMU on (intel_iommu=on, recommended)", check_iommu, ("igpu",)),
    CheckSpec("modules", "Modules loaded (kvmgt, mdev, vfio, kvm)", check_modules, ("igpu", "kernel-config")),
    CheckSpec("mdev-types", "mdev types registered by kvmgt", check_mdev_types, ("igpu", "kernel-config")),
    CheckSpec("aperture", "BIOS aperture and the vGPUs it allows", check_aperture, ("igpu",)),
)
