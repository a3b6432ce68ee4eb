"""vGPU lifecycle on mdev: reading parents and types, definitions, ownership, create/define/start."""
