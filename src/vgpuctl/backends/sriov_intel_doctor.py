"""The doctor's checks for Intel SR-IOV VFs (sriov.md 2.2, 2.6, 6, 8), one per pain a host can show: an Intel GPU
with the SR-IOV capability and a driver that makes VFs (i915-sriov-dkms or xe, not the stock i915);
i915-sriov-dkms built for the running kernel (its module's vermagic is this kernel's: pain 3, the top one);
Secure Boot refusing an unsigned module or one whose key is not enrolled (pain 10); the GuC firmware of the
platform (pain 8); i915.max_vfs, GuC submission, xe's max_vfs and its configfs override (pain 2); the IOMMU;
the VFs on vfio-pci rather than on the host's i915/xe (pain 7); and VFs that will not come back at boot
(pain 4). "Not needed" on hosts without an Intel SR-IOV GPU."""

from __future__ import annotations

from vgpuctl.backends import sriov_intel
from vgpuctl.backends.gvt_platforms import platform_for
from vgpuctl.backends.vf_definitions import UNIT_NAME as VF_UNIT  # makes vgpuctl's VF configurations at boot
from vgpuctl.host import facts
from vgpuctl.host.doctor import Check, CheckSpec, Context, Host, kernel_param_fix, see_param

NOT_APPLICABLE = "no Intel GPU with SR-IOV"
MOK_FIX = ("mokutil --import {root}/mok.pub  # DKMS's signing key (dkms 3 makes it); then reboot and enroll it in "
           "MokManager (blue screen at boot: 'Enroll MOK'), or turn Secure Boot off in the firmware setup")

DKMS_FIX = ("Install i915-sriov-dkms (github.com/strongtz/i915-sriov-dkms: 'dkms install' of its release, or the "
            "distribution's package), keep xe off the iGPU (module_blacklist=xe), then set "
            f"{sriov_intel.SETUP_FLAGS} (vgpuctl setup) and reboot.")


def _pfs(ctx: Context) -> list[sriov_intel.IntelPf]:
    return ctx.facts(_read_pfs)


def _read_pfs(host: Host) -> list[sriov_intel.IntelPf]:
    return sriov_intel.intel_pfs(host.root)


def _dkms_igpu(ctx: Context) -> sriov_intel.IntelPf | None:
    """The PF that is an iGPU whose SR-IOV comes from i915-sriov-dkms (sriov_intel.I915_DKMS_PLATFORMS)."""
    for pf in _pfs(ctx):
        if pf.address == sriov_intel.IGPU_ADDRESS and _platform(pf) in sriov_intel.I915_DKMS_PLATFORMS:
            return pf
    return None


def _platform(pf: sriov_intel.IntelPf) -> str | None:
    device = pf.pf.function.device
    found = platform_for(device) if device is not None else None
    return found.name.split(" (")[0] if found else None


def _not_needed(ctx: Context, c: Check) -> bool:
    """No Intel SR-IOV GPU: this check is not needed (and says so); else False."""
    if _pfs(ctx):
        return False
    c.not_applicable = NOT_APPLICABLE
    c.set("skip", f"Not needed on this host: {NOT_APPLICABLE}.")
    return True


def check_sriov_pf(ctx: Context, c: Check) -> None:
    host = ctx.host
    pfs = _pfs(ctx)
    if not pfs:
        c.not_applicable = "no Intel GPU with SR-IOV"
        c.set("skip", "No Intel GPU with the SR-IOV capability (no sriov_totalvfs on an Intel PCI function): "
                      "Intel SR-IOV VFs are not needed here.")
        return
    bad = []
    for pf in pfs:
        base = host.root.pci_device(pf.address)
        c.see(f"{base}/driver", pf.driver or "none")
        c.see(f"{base}/sriov_totalvfs", pf.pf.total_vfs)
        if pf.driver == "i915":
            param = host.root.module_parameter("i915", "max_vfs")
            c.see(param, "present (i915-sriov-dkms)" if host.exists(param) else "absent: the stock i915")
        if pf.driver is None or pf.driver not in sriov_intel.PF_DRIVERS or (
                pf.problem and "stock" in pf.problem):
            bad.append(pf)
    if bad:
        pf = bad[0]
        fix = DKMS_FIX if pf.driver == "i915" else (
            "Load i915-sriov-dkms (Alder/Raptor Lake, N100) or xe (Battlemage, Panther Lake) for the GPU"
            + (": sriov-dkms and sriov-secboot say why i915 did not load." if pf.driver is None else "."))
        c.set("fail", f"{pf.address}: {pf.problem}.", fix)
        return
    detail = "; ".join(f"{pf.address} under {pf.driver} can make VFs (" + (
        f"up to {pf.pf.total_vfs} allowed now)" if pf.pf.total_vfs else "none allowed now: see sriov-params)")
        for pf in pfs) + "."
    # sriov.md 0.1: xe's SR-IOV on these iGPUs is experimental (ADL VFs fail to initialise, strongtz#454).
    xe_igpu = next((pf for pf in pfs if pf.driver == "xe" and pf.address == sriov_intel.IGPU_ADDRESS
                    and _platform(pf) in sriov_intel.I915_DKMS_PLATFORMS and pf.pf.total_vfs), None)
    if xe_igpu is not None:
        c.set("warn", f"{detail} But xe's SR-IOV on {_platform(xe_igpu)} is experimental: its VFs often fail to "
                      "initialise in the guest; i915-sriov-dkms is the driver that works there.", DKMS_FIX)
        return
    c.set("ok", detail)


def check_sriov_params(ctx: Context, c: Check) -> None:
    host = ctx.host
    problems, unexplained = [], []
    for pf in _pfs(ctx):
        if pf.driver == "i915":
            _, _, max_vfs = see_param(host, c, "i915", "max_vfs")
            _, _, guc = see_param(host, c, "i915", "enable_guc")
            c.see(host.root.module_parameter("i915", "max_vfs"), max_vfs)
            c.see(host.root.module_parameter("i915", "enable_guc"), guc)
            guc_value = facts.as_int(guc)
            if not facts.as_int(max_vfs):
                problems.append("i915.max_vfs is 0: i915 makes no VFs")
            if guc_value is None or guc_value < 0 or not guc_value & 1:
                problems.append(f"GuC submission is off (i915.enable_guc={guc}): the PF cannot run VFs")
            if facts.as_int(max_vfs) and guc_value is not None and guc_value & 1 and pf.pf.total_vfs == 0:
                unexplained.append(f"{pf.address}: i915 allows no VFs although max_vfs and enable_guc ask for "
                                   "them (GuC did not start, or the firmware left the VF BARs unassigned)")
        elif pf.driver == "xe" and pf.pf.total_vfs == 0:
            problems.append(_xe_problem(ctx, c, pf))
        c.see(f"{host.root.pci_device(pf.address)}/sriov_totalvfs", pf.pf.total_vfs)
    if unexplained and not problems:
        c.set("fail", "; ".join(unexplained) + ".", "dmesg | grep -iE 'guc|VFs BAR|SR-IOV'  # i915 says why the PF "
              "runs natively; 'VFs BAR not ready': enable SR-IOV in the firmware setup")
        return
    if problems:
        xe_only = all(pf.driver == "xe" for pf in _pfs(ctx))
        c.set("fail", "; ".join(problems) + ".", _xe_fix(ctx) if xe_only else kernel_param_fix(
            host, sriov_intel.SETUP_FLAGS) + "  # with i915-sriov-dkms installed (see sriov-dkms)")
        return
    c.set("ok", "The PF drivers' parameters allow VFs (i915: max_vfs > 0 and GuC submission; xe: max_vfs).")


def _xe_problem(ctx: Context, c: Check, pf: sriov_intel.IntelPf) -> str:
    """Why xe allows no VFs on this PF: xe.max_vfs=0, its configfs override 0, or a platform without SR-IOV."""
    host = ctx.host
    _, _, param = see_param(host, c, "xe", "max_vfs")
    c.see(host.root.module_parameter("xe", "max_vfs"), param)
    configfs = host.value(host.root.xe_configfs_max_vfs(pf.address))
    if configfs is not None:
        c.see(host.root.xe_configfs_max_vfs(pf.address), configfs)
    if facts.as_int(param) == 0:
        return f"{pf.address}: xe.max_vfs is 0: xe makes no VFs"
    if configfs is not None and facts.as_int(configfs) == 0:
        return f"{pf.address}: xe's configfs max_vfs is 0 for this GPU: xe makes no VFs on it"
    platform = _platform(pf) or "this platform"
    if platform == "Battlemage":
        return f"{pf.address}: xe allows no VFs: Battlemage is a PF under xe from Linux 6.17, on Arc Pro cards only"
    return f"{pf.address}: xe allows no VFs: {platform} has no SR-IOV under xe"


def _xe_fix(ctx: Context) -> str:
    host = ctx.host
    pf = _pfs(ctx)[0]
    if facts.as_int(host.value(host.root.module_parameter("xe", "max_vfs"))) == 0:
        return "remove xe.max_vfs=0 from the kernel command line and modprobe.d, then reboot"
    if facts.as_int(host.value(host.root.xe_configfs_max_vfs(pf.address))) == 0:
        return (f"echo {pf.address} > {host.root.pci_driver('xe')}/unbind && echo unlimited > "
                f"{host.root.xe_configfs_max_vfs(pf.address)} && echo {pf.address} > {host.root.pci_driver('xe')}/bind"
                "  # configfs is read when xe probes the GPU")
    if _platform(pf) in sriov_intel.I915_DKMS_PLATFORMS:
        return "use i915-sriov-dkms for this iGPU: " + sriov_intel.SRIOV_FIX
    return "No fix on this GPU under xe: its SR-IOV needs another platform (Arc Pro B50/B60, Panther Lake)."


def check_sriov_vfs(ctx: Context, c: Check) -> None:
    host = ctx.host
    on_host, ready = [], 0
    for pf in _pfs(ctx):
        c.see(f"{host.root.pci_device(pf.address)}/sriov_numvfs", "?" if pf.pf.num_vfs is None else pf.pf.num_vfs)
        for vf in pf.pf.vfs:
            c.see(f"{host.root.pci_device(vf.address)}/driver", vf.driver or "none")
            if vf.driver in sriov_intel.VFIO_DRIVERS:
                ready += 1
            else:
                on_host.append((pf, vf.address, vf.driver))
    if on_host:
        pf = on_host[0][0]
        c.set("fail", "VFs bound to a host driver instead of vfio-pci (QEMU cannot open them; autoprobe gave them "
                      "to i915/xe): " + ", ".join(f"{a} ({d or 'no driver'})" for _, a, d in on_host) + ".",
              f"vgpuctl vfs enable {pf.address} {len(pf.pf.vfs)} --force  # rebinds every VF to {pf.vfio_driver} "
              "by driver_override")
        return
    ctx.kinds.append("Intel SR-IOV")
    if not ready:
        pf = _pfs(ctx)[0]
        c.set("ok", f"No VFs enabled yet: 'vgpuctl vfs enable {pf.address} N' makes N of them for VMs.")
        return
    c.set("ok", f"{ready} VF{'s' if ready > 1 else ''} on a VFIO driver, ready for VMs ('vgpuctl vfs list').")


# ---------------------------------------------------------------------- around the driver (pains 3, 10, 8)


def _dkms_modules(host: Host, release: str) -> list[str]:
    """i915-sriov-dkms's module files installed for a kernel (i915.ko[.xz|.gz|.zst] under updates/dkms, extra)."""
    found = []
    for directory in host.root.dkms_module_dirs(release):
        found += [f"{directory}/{n}" for n in sorted(host.listdir(directory) or []) if facts.module_name(n) == "i915"]
    return found


def _dkms_built_for(host: Host) -> dict[str, list[str]]:
    """version -> the kernels DKMS built i915-sriov-dkms for (its tree: <version>/<kernel>/<arch>/)."""
    base = f"{host.root.dkms_tree}/{sriov_intel.DKMS_NAME}"
    return {version: sorted(k for k in host.listdir(f"{base}/{version}") or [] if k not in ("source", "build"))
            for version in sorted(host.listdir(base) or [])}


def _module_data(host: Host, path: str) -> bytes | None:
    try:
        return facts.read_module(host.root, path)
    except (OSError, ValueError, EOFError):
        return None


def _secure_boot(host: Host) -> bool | None:
    try:
        return facts.parse_efi_bool(host.root.path(host.root.efi_secure_boot).read_bytes())
    except OSError:
        return None


def _loaded_dkms(host: Host) -> bool:
    """Whether the loaded i915 is i915-sriov-dkms (the stock one has no max_vfs parameter)."""
    return host.exists(host.root.module_parameter("i915", "max_vfs"))


def check_sriov_dkms(ctx: Context, c: Check) -> None:
    host = ctx.host
    if _not_needed(ctx, c):
        return
    if _dkms_igpu(ctx) is None:
        c.set("skip", "No iGPU of i915-sriov-dkms's platforms: the PF's driver (xe) is the kernel's own.")
        return
    release = host.release or "?"
    c.see(host.root.proc_osrelease, release)
    built = _dkms_built_for(host)
    kernels = sorted({k for ks in built.values() for k in ks})
    c.see(f"{host.root.dkms_tree}/{sriov_intel.DKMS_NAME}", "; ".join(
        f"{v}: built for {', '.join(ks) or 'no kernel'}" for v, ks in built.items()) or "absent: never installed")
    modules = _dkms_modules(host, release)
    version = next(iter(built), "<version>")
    install = f"dkms install {sriov_intel.DKMS_NAME}/{version} -k {release}"
    for path in modules:
        data = _module_data(host, path)
        vermagic = facts.parse_modinfo(data).get("vermagic") if data is not None else None
        c.see(path, f"vermagic {vermagic.strip()}" if vermagic else "present (compressed: vermagic not read)")
        if vermagic and facts.vermagic_release(vermagic) != release:
            c.set("fail", f"{path} was built for Linux {facts.vermagic_release(vermagic)}, not for the running "
                          f"{release}: modprobe refuses it ('Exec format error'), so i915 does not load.",
                  f"{install} --force && reboot  # rebuilds it for this kernel")
            return
    loaded = "i915" in host.loaded
    c.see(host.root.proc_modules, "i915: " + ("loaded, i915-sriov-dkms" if loaded and _loaded_dkms(host) else
                                              "loaded, the stock i915" if loaded else "not loaded"))
    if not modules:
        if kernels:
            c.set("fail", f"i915-sriov-dkms is built for {', '.join(kernels)} but not for the running kernel "
                          f"{release} (the kernel was updated and DKMS did not build it, usually because this "
                          "release does not support that kernel): the stock i915 runs, and it makes no VFs.",
                  f"{install} && reboot  # if the build fails: install the i915-sriov-dkms release whose dkms.conf "
                  "BUILD_EXCLUSIVE_KERNEL covers this kernel, or boot the kernel it was built for")
        else:
            c.set("fail", "i915-sriov-dkms is not installed: the stock i915 makes no VFs.", DKMS_FIX)
        return
    if loaded and not _loaded_dkms(host):
        c.set("fail", f"i915-sriov-dkms is installed for {release} ({modules[0]}) but the stock i915 is loaded: "
                      "the initramfs still holds the stock module, or depmod has not ranked the DKMS one first.",
              "depmod -a && update-initramfs -u && reboot  # dracut -f on Fedora")
        return
    if not loaded and _secure_boot(host):
        c.set("warn", f"i915-sriov-dkms is built for the running kernel {release}, but not loaded: Secure Boot is "
                      "on (see sriov-secboot).")
        return
    if not loaded:
        c.set("fail", f"i915-sriov-dkms is installed for {release} but i915 is not loaded.",
              "modprobe i915; dmesg | grep -i i915  # says why it does not load")
        return
    c.set("ok", f"i915-sriov-dkms {version} is built for the running kernel {release} and loaded.")


def check_sriov_secure_boot(ctx: Context, c: Check) -> None:
    host = ctx.host
    if _not_needed(ctx, c):
        return
    state = _secure_boot(host)
    c.see(host.root.efi_secure_boot, "absent (no EFI, or efivarfs not mounted)" if state is None else
          "1: on" if state else "0: off")
    if _dkms_igpu(ctx) is None:
        c.set("skip", "No out-of-tree module to sign: the PF's driver (xe) is the kernel's own, signed with it.")
        return
    if not state:
        c.set("ok", "Secure Boot is off: the kernel loads unsigned modules (i915-sriov-dkms).")
        return
    modules = _dkms_modules(host, host.release or "?")
    data = _module_data(host, modules[0]) if modules else None
    signed = facts.module_signed(data) if data is not None else None
    if modules:
        c.see(modules[0], "signed" if signed else "not signed" if signed is False else "compressed: not read")
    key = f"{host.root.dkms_tree}/mok.pub"
    c.see(key, "present" if host.exists(key) else "absent")
    loaded = "i915" in host.loaded
    if signed is False:
        c.set("fail", "Secure Boot is on and i915-sriov-dkms's module is not signed: the kernel refuses it ('Key was "
                      "rejected by service'), so i915 does not load.",
              f"dkms 3 signs what it builds once {host.root.dkms_tree}/mok.key exists: 'dkms generate_mok' (or "
              f"any build makes it), rebuild with 'dkms install --force {sriov_intel.DKMS_NAME}/<version>', then "
              + MOK_FIX.format(root=host.root.dkms_tree))
        return
    if not loaded and modules:
        what = "is signed" if signed else "is compressed (its signature not read)"
        c.set("fail", f"Secure Boot is on and i915-sriov-dkms {what}, but the kernel did not load it: its key is "
                      "not enrolled as a Machine Owner Key (mokutil --list-enrolled does not show it).",
              MOK_FIX.format(root=host.root.dkms_tree))
        return
    c.set("ok", "Secure Boot is on, and the loaded i915 passed its signature check.")


def check_sriov_guc_firmware(ctx: Context, c: Check) -> None:
    host = ctx.host
    if _not_needed(ctx, c):
        return
    pf = _dkms_igpu(ctx)
    prefix = sriov_intel.GUC_FIRMWARE_PREFIX.get(_platform(pf) or "") if pf else None
    if pf is None or prefix is None or pf.driver == "xe":
        c.set("skip", "Not i915 on an iGPU of i915-sriov-dkms's platforms: xe's firmware is xe's (see dmesg for "
                      "'GuC firmware').")
        return
    directory = host.root.lib_firmware("i915")
    found = [n for n in host.listdir(directory) or [] if n.startswith(f"{prefix}_guc_") and ".bin" in n]
    c.see(f"{directory}/{prefix}_guc_*.bin", ", ".join(sorted(found)) or "absent")
    if not found:
        c.set("fail", f"No GuC firmware for {_platform(pf)} ({directory}/{prefix}_guc_*.bin): i915 cannot start GuC "
                      "submission, so the PF runs natively and makes no VFs.",
              "apt install linux-firmware  # Debian: firmware-misc-nonfree; Fedora: linux-firmware\n"
              "update-initramfs -u && reboot  # the initramfs must carry it too (dracut -f on Fedora)")
        return
    c.set("ok", f"GuC firmware for {_platform(pf)} is installed ({', '.join(sorted(found))}).")


def check_sriov_iommu(ctx: Context, c: Check) -> None:
    host = ctx.host
    if _not_needed(ctx, c):
        return
    units = host.listdir(host.root.sys_class_iommu) or []
    groups = host.listdir(host.root.sys_kernel_iommu_groups) or []
    cmd = host.cmdline_param("intel_iommu")
    c.see(host.root.proc_cmdline, f"intel_iommu={cmd}" if cmd is not None else "no intel_iommu")
    c.see(host.root.sys_class_iommu, " ".join(units) or "empty")
    c.see(host.root.sys_kernel_iommu_groups, f"{len(groups)} groups")
    if units and groups:
        c.set("ok", f"The IOMMU is on ({', '.join(units)}, {len(groups)} IOMMU groups): VFs get groups for vfio-pci.")
        return
    why = ("intel_iommu=on is given but no IOMMU is active: VT-d is off in the firmware" if cmd == "on" else
           "The IOMMU (VT-d) is off")
    c.set("fail", f"{why}: vfio-pci gives a VM a VF only through its IOMMU group, so no VM can take a VF.",
          "Enable 'VT-d' in the firmware setup" if cmd == "on" else kernel_param_fix(host, "intel_iommu=on"))


def vf_boot_unit(host: Host) -> tuple[str, bool, bool]:
    """(the unit's path, whether it exists, whether it is enabled: a link to it in some *.wants/)."""
    base = host.root.etc_systemd_system
    path = f"{base}/{VF_UNIT}"
    enabled = any(host.root.path(f"{base}/{d}/{VF_UNIT}").is_symlink() or host.exists(f"{base}/{d}/{VF_UNIT}")
                  for d in host.listdir(base) or [] if d.endswith(".wants"))
    return path, host.exists(path), enabled


def sysfs_d_lines(host: Host) -> list[str]:
    """sysfsutils lines that set sriov_numvfs at boot (i915-sriov-dkms's README way)."""
    files = [f"{host.root.etc_sysfs_d}/{n}" for n in sorted(host.listdir(host.root.etc_sysfs_d) or [])]
    return [f"{path}: {line.strip()}" for path in [host.root.etc_sysfs_conf, *files]
            for line in (host.read(path) or "").splitlines() if "sriov_numvfs" in line and not line.startswith("#")]


def persistence(host: Host, c: Check, enabled_now: list[str], fix: str) -> None:
    """VFs enabled now are runtime state (sriov.md 8): warn when nothing makes them again at boot."""
    path, exists, enabled = vf_boot_unit(host)
    c.see(path, "enabled" if enabled else "present, not enabled" if exists else "absent")
    lines = sysfs_d_lines(host)
    if lines:
        c.see(host.root.etc_sysfs_d, "; ".join(lines))
    if not enabled_now:
        c.set("ok", "No VFs enabled: nothing to make again at boot.")
        return
    if enabled:
        c.set("ok", f"{VF_UNIT} makes the VFs again at boot ({', '.join(enabled_now)}).")
        return
    if lines:
        c.set("ok", f"sysfsutils sets sriov_numvfs at boot ({lines[0]}); on Debian 13 / PVE 9 only with "
                    f"{host.root.etc_sysfs_conf} present.")
        return
    c.set("warn", f"VFs are enabled now ({', '.join(enabled_now)}) but nothing makes them again at boot: VFs are "
                  "runtime state, gone after a reboot, and VMs using them then fail to start."
          + (f" {path} exists but is not enabled." if exists else ""),
          f"systemctl enable {VF_UNIT}" if exists else fix)


def check_sriov_boot(ctx: Context, c: Check) -> None:
    if _not_needed(ctx, c):
        return
    enabled = [f"{pf.address}: {pf.pf.num_vfs}" for pf in _pfs(ctx) if pf.pf.num_vfs]
    for pf in _pfs(ctx):
        c.see(f"{ctx.host.root.pci_device(pf.address)}/sriov_numvfs", pf.pf.num_vfs)
    persistence(ctx.host, c, enabled, f"install vgpuctl's VF boot unit ({VF_UNIT} in "
                                      f"{ctx.host.root.etc_systemd_system}): it makes the VF configurations "
                                      "'vgpuctl vfs enable' recorded (state directory vfs/) again at boot")


CHECKS = (
    CheckSpec("sriov-pf", "Intel GPU with SR-IOV and a driver that makes VFs (i915-sriov-dkms or xe)",
              check_sriov_pf),
    CheckSpec("sriov-dkms", "i915-sriov-dkms built for the running kernel and loaded", check_sriov_dkms),
    CheckSpec("sriov-secboot", "Secure Boot lets i915-sriov-dkms load (signed, key enrolled)",
              check_sriov_secure_boot),
    CheckSpec("sriov-guc-fw", "GuC firmware of the platform (/lib/firmware/i915)", check_sriov_guc_firmware),
    CheckSpec("sriov-params", "i915.max_vfs and GuC submission (i915.enable_guc); xe.max_vfs", check_sriov_params,
              ("sriov-pf", "sriov-guc-fw")),
    CheckSpec("sriov-iommu", "IOMMU on, VFs in IOMMU groups (intel_iommu=on)", check_sriov_iommu),
    CheckSpec("sriov-vfs", "VFs bound to vfio-pci, not to the host's i915/xe", check_sriov_vfs,
              ("sriov-params", "sriov-iommu")),
    CheckSpec("sriov-boot", "VFs made again at boot (vgpuctl-vfs.service)", check_sriov_boot),
)
