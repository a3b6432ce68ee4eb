"""Virtual machines on vGPUs: specs and profiles, the QEMU command line, libvirt XML, the lifecycle."""
