from vgpuctl.cli import main

main()
