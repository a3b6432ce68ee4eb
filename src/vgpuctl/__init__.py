"""vgpuctl: run virtual machines on shared GPUs (Intel GVT-g and other mdev vGPUs) with Linux KVM."""

__version__ = "0.1.0"
